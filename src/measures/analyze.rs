//! `moescope analyze`: every measure of SPEC.md on a checkpoint, written as
//! the JSON document of SPEC.md "Machine-readable results"
//! (schema `moescope.analysis/1`).

use super::jacobian::{layer_jacobian, JacobianMode, JacobianReport};
use super::subspace::{layer_subspaces, Moments, RankRule, SubspaceReport};
use super::{gap_ratio, mean_present, weight_overlap, Family, LayerAccumulator, Telemetry};
use crate::model::Gpt;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The schema id written into every analysis.
pub const SCHEMA: &str = "moescope.analysis/1";

/// Where the analysed model and tokens came from.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub checkpoint: String,
    pub data: String,
    pub seed: u64,
}

/// Function- and representation-space options (issue: Jacobians, subspaces).
#[derive(Debug, Clone)]
pub struct GeometryOptions {
    pub jacobian: JacobianMode,
    /// Jacobian alignment over all pairs instead of routed pairs.
    pub jacobian_all_pairs: bool,
    /// Tokens (the first ones analysed) used for Jacobian alignment.
    pub jacobian_tokens: usize,
    /// Routed tokens per expert whose Jacobian spectrum is computed (0 = none).
    pub spectra_tokens: usize,
    /// Singular values reported per expert.
    pub top_singular_values: usize,
    pub subspace: RankRule,
    /// PCA of expert outputs h_e instead of inputs.
    pub output_space: bool,
    /// Weight rows by the gate g_e.
    pub weighted: bool,
    pub seed: u64,
}

impl Default for GeometryOptions {
    fn default() -> Self {
        GeometryOptions {
            jacobian: JacobianMode::Off,
            jacobian_all_pairs: false,
            jacobian_tokens: 1024,
            spectra_tokens: 16,
            top_singular_values: 8,
            subspace: RankRule::Off,
            output_space: false,
            weighted: false,
            seed: 0,
        }
    }
}

/// Options that produced the numbers.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    /// Tokens requested.
    pub tokens: usize,
    pub families: Vec<Family>,
    /// Activation overlap pairs reported: `routed` (act_mso) and `all` (act_mso_all).
    pub pairs: Vec<&'static str>,
    pub seq_len: usize,
    pub batch: usize,
    pub routing: crate::config::Routing,
    pub top_k: usize,
    pub norm_topk: bool,
    /// `exact`, `estimate:M`, `auto` or `off` (the mode used per layer is in each layer's `jacobian.mode`).
    pub jacobian: String,
    pub jacobian_pairs: &'static str,
    pub jacobian_tokens: usize,
    /// `RANK`, `var:τ:CAP` or `off`.
    pub subspace: String,
    pub subspace_space: &'static str,
    pub subspace_weighted: bool,
}

/// One MoE layer's measures.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Block index of this MoE layer in the model.
    pub index: usize,
    pub weight_mso: BTreeMap<&'static str, f64>,
    /// E×E cosines G_ij per family, diagonal null.
    pub weight_overlap: BTreeMap<&'static str, Vec<Vec<Option<f64>>>>,
    /// Activation MSO over routed pairs; null for k = 1 (see `act_mso_null_reason`).
    pub act_mso: Option<f64>,
    pub act_mso_null_reason: Option<String>,
    /// Activation MSO over all E(E−1)/2 pairs.
    pub act_mso_all: Option<f64>,
    /// E×E mean cos² of co-routed pairs (null diagonal / never co-routed).
    pub act_overlap: Vec<Vec<Option<f64>>>,
    /// act_mso / weight_mso(up).
    pub gap_ratio: Option<f64>,
    /// Routing telemetry (`load`, `fraction`, `router_entropy`, `load_entropy`,
    /// `balance`, `dead_experts`, `max_violation`), written at this level.
    #[serde(flatten)]
    pub telemetry: Telemetry,
    /// Function space (null when off).
    pub jacobian: Option<JacobianReport>,
    /// Representation space (null when off).
    pub subspace: Option<SubspaceReport>,
}

/// Model-level summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Unweighted mean over MoE layers, per family.
    pub weight_mso: BTreeMap<&'static str, f64>,
    pub act_mso: Option<f64>,
    pub act_mso_all: Option<f64>,
    /// mean act_mso / mean weight_mso(up) (ratio of the model means).
    pub gap_ratio: Option<f64>,
    pub router_entropy: f64,
    pub load_entropy: f64,
    pub balance: f64,
    pub dead_experts: usize,
    pub max_violation: f64,
}

/// The analysis document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub source: Source,
    pub options: Options,
    /// Tokens evaluated.
    pub tokens: usize,
    pub layers: Vec<LayerReport>,
    pub summary: Summary,
}

/// Read token ids from a JSON array of integers or a 1-D `.npy` of integers.
pub fn read_token_ids(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::bad_file(path, m);
    let ids: Vec<i128> = if bytes.starts_with(b"\x93NUMPY") {
        read_npy(&bytes).map_err(bad)?
    } else {
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("neither .npy nor JSON: {e}")))?;
        let arr = v
            .as_array()
            .ok_or_else(|| bad("expected a JSON array of integers".into()))?;
        arr.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_i64()
                    .map(i128::from)
                    .ok_or_else(|| bad(format!("element {i} is not an integer: {x}")))
            })
            .collect::<Result<_>>()?
    };
    ids.iter()
        .enumerate()
        .map(|(i, &x)| {
            u32::try_from(x).map_err(|_| bad(format!("element {i} = {x} is not a valid token id")))
        })
        .collect()
}

fn read_npy(b: &[u8]) -> std::result::Result<Vec<i128>, String> {
    if b.len() < 10 {
        return Err("truncated .npy header".into());
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("truncated .npy header")?)
        .map_err(|e| e.to_string())?;
    let field = |k: &str| -> Option<String> {
        let i = header.find(&format!("'{k}'"))?;
        let rest = &header[i + k.len() + 2..];
        let rest = rest[rest.find(':')? + 1..].trim_start();
        Some(rest.to_string())
    };
    let descr = field("descr").ok_or("no descr in .npy header")?;
    let descr = descr.trim_start_matches('\'');
    let descr = &descr[..descr.find('\'').ok_or("bad descr")?];
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape = field("shape").ok_or("no shape in .npy header")?;
    let dims: Vec<usize> = shape[1..shape.find(')').ok_or("bad shape")?]
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| format!("bad shape {shape}")))
        .collect::<std::result::Result<_, _>>()?;
    if dims.len() != 1 {
        return Err(format!("expected a 1-D array, found shape {dims:?}"));
    }
    let data = &b[start + hlen..];
    let (width, signed, big) = match descr {
        "|u1" | "<u1" => (1, false, false),
        "|i1" | "<i1" => (1, true, false),
        "<u2" => (2, false, false),
        "<i2" => (2, true, false),
        "<u4" => (4, false, false),
        "<i4" => (4, true, false),
        "<u8" => (8, false, false),
        "<i8" => (8, true, false),
        ">i8" | ">i4" | ">u4" | ">u8" => (0, false, true),
        other => {
            return Err(format!(
                "dtype {other} is not an integer type (expected int8..int64 or uint8..uint64)"
            ))
        }
    };
    if big {
        return Err("big-endian arrays are not supported".into());
    }
    if data.len() != dims[0] * width {
        return Err(format!(
            "data holds {} bytes, shape needs {}: truncated file?",
            data.len(),
            dims[0] * width
        ));
    }
    Ok(data
        .chunks_exact(width)
        .map(|c| {
            let mut buf = [0u8; 8];
            buf[..width].copy_from_slice(c);
            let u = u64::from_le_bytes(buf);
            if signed {
                let shift = 64 - 8 * width as u32;
                (((u << shift) as i64) >> shift) as i128
            } else {
                u as i128
            }
        })
        .collect())
}

/// Run every measure on `tokens` (the first `n` are used, in windows of the
/// model's context, `batch` windows per forward pass).
pub fn analyze(
    model: &Gpt,
    tokens: &[u32],
    n: usize,
    batch: usize,
    families: &[Family],
    source: Source,
) -> Result<Report> {
    analyze_with(
        model,
        tokens,
        n,
        batch,
        families,
        &GeometryOptions::default(),
        source,
    )
}

/// [`analyze`] with function- and representation-space measures.
pub fn analyze_with(
    model: &Gpt,
    tokens: &[u32],
    n: usize,
    batch: usize,
    families: &[Family],
    geo: &GeometryOptions,
    source: Source,
) -> Result<Report> {
    let moe_layers: Vec<usize> = model.moe_layers().map(|(l, _)| l).collect();
    if moe_layers.is_empty() {
        return Err(Error::Data(
            "the model has no MoE layer: nothing to analyse".into(),
        ));
    }
    if tokens.is_empty() {
        return Err(Error::Data(
            "no tokens to analyse (the token input is empty)".into(),
        ));
    }
    if n == 0 || n > tokens.len() {
        return Err(Error::Data(format!(
            "--tokens {n} is not between 1 and the {} tokens available",
            tokens.len()
        )));
    }
    let vocab = model.cfg.vocab_size;
    if let Some((i, &t)) = tokens[..n]
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(Error::Data(format!(
            "token {i} has id {t}, outside the model's vocabulary of {vocab}"
        )));
    }
    let dev = model.params.device().clone();
    let t = model.cfg.seq_len;
    let k = model.cfg.active_experts();
    let mut accs: Vec<LayerAccumulator> = moe_layers
        .iter()
        .map(|_| LayerAccumulator::new(model.cfg.n_experts, k))
        .collect();
    let d = model.cfg.d_model;
    let mut moments: Vec<Vec<Moments>> = moe_layers
        .iter()
        .map(|_| (0..model.cfg.n_experts).map(|_| Moments::new(d)).collect())
        .collect();
    // Inputs and selections kept for the Jacobian measures (first `jacobian_tokens` tokens).
    let mut jac_inputs: Vec<Vec<Tensor>> = vec![Vec::new(); moe_layers.len()];
    let mut jac_sel: Vec<Vec<u32>> = vec![Vec::new(); moe_layers.len()];
    let mut jac_n = 0usize;
    let windows = crate::data::eval_windows(n + 1, t, 0); // inputs cover tokens[0..n]
    for r in crate::data::batch_ranges(&windows, batch, |a, b| a.1 == b.1) {
        let (b, len) = (r.len(), windows[r.start].1);
        let mut inputs = Vec::with_capacity(b * len);
        for &(s, l) in &windows[r] {
            inputs.extend_from_slice(&tokens[s..s + l]);
        }
        let x = Tensor::from_vec(inputs, (b, len), &dev)?;
        let out = model.forward(&x, true)?;
        let batch_n = b * len;
        let take = geo.jacobian_tokens.saturating_sub(jac_n).min(batch_n);
        for (li, ((acc, cap), (_, moe))) in accs
            .iter_mut()
            .zip(&out.captures)
            .zip(model.moe_layers())
            .enumerate()
        {
            acc.add(&cap.moe)?;
            if geo.jacobian != JacobianMode::Off && take > 0 {
                jac_inputs[li].push(cap.input.narrow(0, 0, take)?);
                jac_sel[li].extend_from_slice(&cap.moe.selected[..take * cap.moe.k]);
            }
            if geo.subspace != RankRule::Off {
                add_moments(
                    &mut moments[li],
                    cap,
                    geo,
                    model.cfg.norm_topk && model.cfg.routing == crate::config::Routing::Topk,
                )?;
            }
            // All pairs: every expert on every token of this layer's input.
            let d = cap.input.dim(1)?;
            let outs: Vec<Vec<f32>> = moe
                .experts
                .iter()
                .map(|e| {
                    e.forward(&cap.input)?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()
                        .map_err(Into::into)
                })
                .collect::<Result<_>>()?;
            acc.add_all_pairs(&outs, d);
        }
        jac_n += take;
    }

    let mut layers = Vec::new();
    let mut ups = Vec::new(); // weight MSO (up) per layer, for the gap ratios
    for ((&index, (_, moe)), acc) in moe_layers.iter().zip(model.moe_layers()).zip(&accs) {
        let mut wm = BTreeMap::new();
        let mut wo = BTreeMap::new();
        for &f in families {
            if let Some(w) = weight_overlap(moe, f)? {
                wm.insert(f.name(), w.mso);
                wo.insert(f.name(), w.matrix);
            }
        }
        let up = match wm.get(Family::Up.name()) {
            Some(&v) => Some(v),
            None => weight_overlap(moe, Family::Up)?.map(|w| w.mso),
        };
        ups.push(up);
        let li = layers.len();
        let jacobian = if geo.jacobian != JacobianMode::Off && !jac_inputs[li].is_empty() {
            let x = Tensor::cat(&jac_inputs[li], 0)?;
            layer_jacobian(
                moe,
                &x,
                &jac_sel[li],
                k,
                geo.jacobian,
                geo.jacobian_all_pairs,
                geo.spectra_tokens,
                geo.top_singular_values,
                geo.seed + index as u64,
            )?
        } else {
            None
        };
        let subspace = layer_subspaces(
            &moments[li],
            geo.subspace,
            if geo.output_space { "output" } else { "input" },
            geo.weighted,
        );
        let (act, reason) = match acc.act_mso() {
            Ok(v) => (Some(v), None),
            Err(r) => (None, Some(r)),
        };
        layers.push(LayerReport {
            index,
            weight_mso: wm,
            weight_overlap: wo,
            act_mso: act,
            act_mso_null_reason: reason,
            act_mso_all: acc.act_mso_all(),
            act_overlap: acc.act_overlap(),
            gap_ratio: gap_ratio(act, up),
            telemetry: acc.telemetry(),
            jacobian,
            subspace,
        });
    }
    let mean =
        |f: &dyn Fn(&LayerReport) -> f64| layers.iter().map(f).sum::<f64>() / layers.len() as f64;
    let mut weight_mso = BTreeMap::new();
    for &f in families {
        let per: Vec<Option<f64>> = layers
            .iter()
            .map(|l| l.weight_mso.get(f.name()).copied())
            .collect();
        if let Some(m) = mean_present(&per) {
            weight_mso.insert(f.name(), m);
        }
    }
    let up_mean = mean_present(&ups);
    let act_mean = mean_present(&layers.iter().map(|l| l.act_mso).collect::<Vec<_>>());
    let summary = Summary {
        weight_mso,
        act_mso: act_mean,
        act_mso_all: mean_present(&layers.iter().map(|l| l.act_mso_all).collect::<Vec<_>>()),
        gap_ratio: gap_ratio(act_mean, up_mean),
        router_entropy: mean(&|l| l.telemetry.router_entropy),
        load_entropy: mean(&|l| l.telemetry.load_entropy),
        balance: mean(&|l| l.telemetry.balance),
        dead_experts: layers.iter().map(|l| l.telemetry.dead_experts.len()).sum(),
        max_violation: layers
            .iter()
            .map(|l| l.telemetry.max_violation)
            .fold(0.0, f64::max),
    };
    Ok(Report {
        schema: SCHEMA,
        source,
        options: Options {
            tokens: n,
            families: families.to_vec(),
            pairs: vec!["routed", "all"],
            seq_len: t,
            batch,
            routing: model.cfg.routing,
            top_k: model.cfg.top_k,
            norm_topk: model.cfg.norm_topk,
            jacobian: match geo.jacobian {
                JacobianMode::Exact => "exact".into(),
                JacobianMode::Estimate(m) => format!("estimate:{m}"),
                JacobianMode::Auto => "auto".into(),
                JacobianMode::Off => "off".into(),
            },
            jacobian_pairs: if geo.jacobian_all_pairs {
                "all"
            } else {
                "routed"
            },
            jacobian_tokens: geo.jacobian_tokens.min(n),
            subspace: match geo.subspace {
                RankRule::Fixed(r) => r.to_string(),
                RankRule::Variance(t, c) => format!("var:{t}:{c}"),
                RankRule::Off => "off".into(),
            },
            subspace_space: if geo.output_space { "output" } else { "input" },
            subspace_weighted: geo.weighted,
        },
        tokens: accs[0].tokens,
        layers,
        summary,
    })
}

/// Add each expert's routed rows (inputs, or outputs with `output_space`) to its moments.
fn add_moments(
    m: &mut [Moments],
    cap: &crate::model::LayerCapture,
    geo: &GeometryOptions,
    renorm: bool,
) -> Result<()> {
    let e_n = m.len();
    let k = cap.moe.k;
    for (e, (toks, h)) in cap.moe.expert_outputs.iter().enumerate() {
        if toks.is_empty() {
            continue;
        }
        let rows = if geo.output_space {
            match h {
                Some(h) => h.clone(),
                None => continue,
            }
        } else {
            cap.input
                .index_select(&Tensor::new(toks.as_slice(), cap.input.device())?, 0)?
        };
        let w: Option<Vec<f64>> = geo.weighted.then(|| {
            toks.iter()
                .map(|&t| {
                    let t = t as usize;
                    let p = &cap.moe.probs[t * e_n..(t + 1) * e_n];
                    let denom: f64 = if renorm {
                        cap.moe.selected[t * k..(t + 1) * k]
                            .iter()
                            .map(|&s| p[s as usize] as f64)
                            .sum()
                    } else {
                        1.0
                    };
                    p[e] as f64 / denom
                })
                .collect()
        });
        m[e].add(&rows, w.as_deref())?;
    }
    Ok(())
}

/// A short human-readable table of a report.
pub fn summary_table(r: &Report) -> String {
    let f = |v: Option<f64>| {
        v.map(|x| format!("{x:.4}"))
            .unwrap_or_else(|| "null".into())
    };
    let e = |v: Option<f64>| {
        v.map(|x| format!("{x:.3e}"))
            .unwrap_or_else(|| "null".into())
    };
    let mut s = format!(
        "{:>5} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8} {:>5} {:>8}\n",
        "layer",
        "w_mso(up)",
        "act_mso",
        "act_all",
        "gap",
        "H_router",
        "balance",
        "dead",
        "max_viol"
    );
    for l in &r.layers {
        s += &format!(
            "{:>5} {:>10} {:>10} {:>10} {:>9} {:>9.4} {:>8.4} {:>5} {:>8.3}\n",
            l.index,
            e(l.weight_mso.get("up").copied()),
            f(l.act_mso),
            f(l.act_mso_all),
            l.gap_ratio
                .map(|x| format!("{x:.1}"))
                .unwrap_or_else(|| "null".into()),
            l.telemetry.router_entropy,
            l.telemetry.balance,
            l.telemetry.dead_experts.len(),
            l.telemetry.max_violation
        );
    }
    let m = &r.summary;
    for l in &r.layers {
        if let Some(j) = &l.jacobian {
            s += &format!(
                "layer {} Jacobian alignment ({}, {} pairs, {} instances): mean {} | mean |A| {} | mean A² {}{}\n",
                l.index,
                j.mode,
                j.pairs,
                j.instances,
                f(j.mean),
                f(j.mean_abs),
                f(j.mean_sq),
                j.stderr.map(|e| format!(" | stderr {e:.4}")).unwrap_or_default()
            );
        }
        if let Some(sp) = &l.subspace {
            s += &format!(
                "layer {} subspaces ({}): mean overlap {} (random {:.4}) | mean normalised geodesic {} | skipped {}\n",
                l.index,
                sp.space,
                f(sp.mean_overlap),
                sp.random_overlap,
                f(sp.mean_geodesic_normalised),
                sp.skipped.len()
            );
        }
    }
    s += &format!(
        "model weight MSO(up) {} | act MSO {} | act MSO (all pairs) {} | gap ratio {} | over {} tokens\n",
        e(m.weight_mso.get("up").copied()),
        f(m.act_mso),
        f(m.act_mso_all),
        m.gap_ratio.map(|x| format!("{x:.1}")).unwrap_or_else(|| "null".into()),
        r.tokens
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
            .into_bytes();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(b' ');
        }
        h.push(b'\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(&h);
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn npy_integer_dtypes_and_errors() {
        let u16s: Vec<u8> = [1u16, 65535, 7]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            read_npy(&npy("<u2", "(3,)", &u16s)).unwrap(),
            vec![1, 65535, 7]
        );
        let i32s: Vec<u8> = [5i32, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(read_npy(&npy("<i4", "(2,)", &i32s)).unwrap(), vec![5, -1]);
        assert_eq!(read_npy(&npy("|u1", "(2,)", &[3, 4])).unwrap(), vec![3, 4]);
        assert!(read_npy(&npy("<f4", "(1,)", &[0, 0, 0, 0]))
            .unwrap_err()
            .contains("not an integer"));
        assert!(read_npy(&npy("<i4", "(1, 2)", &i32s))
            .unwrap_err()
            .contains("1-D"));
        assert!(read_npy(&npy("<i4", "(3,)", &i32s))
            .unwrap_err()
            .contains("truncated"));
        // Negative ids are refused by the caller with the element index.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("neg.npy");
        std::fs::write(&p, npy("<i4", "(2,)", &i32s)).unwrap();
        let e = read_token_ids(&p).unwrap_err().to_string();
        assert!(e.contains("neg.npy") && e.contains("element 1"), "{e}");
    }
}
