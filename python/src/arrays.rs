//! Arrays in from Python: f32 or f64, C-contiguous (the Python side makes
//! them so, copying only when it must), with shape checks that name the
//! argument and the expected shape.

use crate::bad;
use candle_core::{Device, Tensor};
use numpy::{PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// A float array of either precision.
#[derive(FromPyObject)]
pub enum Floats<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
}

/// Run `$body` with `$s` bound to the array's data as `&[f32]` or `&[f64]`.
macro_rules! with_slice {
    ($arr:expr, |$s:ident| $body:expr) => {
        match $arr {
            $crate::arrays::Floats::F32(a) => {
                let $s = $crate::arrays::contiguous(a)?;
                $body
            }
            $crate::arrays::Floats::F64(a) => {
                let $s = $crate::arrays::contiguous(a)?;
                $body
            }
        }
    };
}
pub(crate) use with_slice;

/// The data of a C-contiguous array.
pub fn contiguous<'a, T: numpy::Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| bad("an array is not C-contiguous; pass numpy.ascontiguousarray(x)"))
}

impl Floats<'_> {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Floats::F32(a) => a.shape().to_vec(),
            Floats::F64(a) => a.shape().to_vec(),
        }
    }

    /// The shape, refused unless it has one of `ndims` dimensions; `expected`
    /// describes the shape in the error, e.g. "(E, d_ff, d)".
    pub fn shape_of(&self, name: &str, ndims: &[usize], expected: &str) -> PyResult<Vec<usize>> {
        let shape = self.shape();
        if !ndims.contains(&shape.len()) {
            return Err(bad(format!(
                "{name}: expected an array of shape {expected}, got shape {shape:?}"
            )));
        }
        if shape.contains(&0) {
            return Err(bad(format!(
                "{name}: shape {shape:?} has an empty dimension"
            )));
        }
        Ok(shape)
    }

    /// A copy as f32 (f64 values rounded).
    pub fn to_f32(&self) -> PyResult<Vec<f32>> {
        Ok(match self {
            Floats::F32(a) => contiguous(a)?.to_vec(),
            Floats::F64(a) => contiguous(a)?.iter().map(|&v| v as f32).collect(),
        })
    }

    /// A copy as f64.
    pub fn to_f64(&self) -> PyResult<Vec<f64>> {
        Ok(match self {
            Floats::F32(a) => contiguous(a)?.iter().map(|&v| v as f64).collect(),
            Floats::F64(a) => contiguous(a)?.to_vec(),
        })
    }

    /// A CPU f64 tensor of `shape` holding a copy of the array.
    pub fn tensor_f64(&self, shape: &[usize]) -> PyResult<Tensor> {
        Tensor::from_vec(self.to_f64()?, shape, &Device::Cpu).map_err(|e| bad(e.to_string()))
    }
}

/// The most experts a layer may have here: the E × E accumulators of the
/// measures stay within a few hundred MB.
pub const MAX_EXPERTS: usize = 4096;

/// Each token's experts (n × k): integers in 0..`n_experts`, −1 for an empty
/// slot, no expert listed twice for one token. Returns them as the library's u32 (empty
/// slots as `NO_EXPERT`), with n and k.
pub fn selection(
    name: &str,
    sel: &PyReadonlyArray2<'_, i64>,
    n_experts: usize,
) -> PyResult<(Vec<u32>, usize, usize)> {
    use moescope::model::moe::NO_EXPERT;
    if n_experts == 0 || n_experts > MAX_EXPERTS {
        return Err(bad(format!(
            "n_experts: {n_experts} experts; expected 1 to {MAX_EXPERTS}"
        )));
    }
    let view = sel.as_array();
    let (n, k) = view.dim();
    if n == 0 || k == 0 {
        return Err(bad(format!(
            "{name}: expected shape (n, k) with n, k ≥ 1, got ({n}, {k})"
        )));
    }
    let mut out = Vec::with_capacity(n * k);
    for (t, row) in view.outer_iter().enumerate() {
        for (s, &e) in row.iter().enumerate() {
            if e == -1 {
                out.push(NO_EXPERT);
                continue;
            }
            if e < 0 || e as usize >= n_experts {
                return Err(bad(format!(
                    "{name}[{t}, {s}] = {e}: not an expert index in 0..{n_experts} (−1 marks an empty slot)"
                )));
            }
            if row.iter().take(s).any(|&p| p == e) {
                return Err(bad(format!("{name}[{t}]: expert {e} is listed twice")));
            }
            out.push(e as u32);
        }
    }
    Ok((out, n, k))
}

/// Router probabilities (n × E) as f32, or uniform ones when not given.
pub fn probabilities(
    probs: Option<&PyReadonlyArray2<'_, f32>>,
    n: usize,
    n_experts: usize,
) -> PyResult<Vec<f32>> {
    let Some(p) = probs else {
        return Ok(vec![1.0 / n_experts as f32; n * n_experts]);
    };
    given_probabilities(p, n, n_experts)
}

/// Router probabilities (n × E) as given, shape-checked.
pub fn given_probabilities(
    p: &PyReadonlyArray2<'_, f32>,
    n: usize,
    n_experts: usize,
) -> PyResult<Vec<f32>> {
    if p.shape() != [n, n_experts] {
        return Err(bad(format!(
            "probs: expected shape (n, E) = ({n}, {n_experts}), got {:?}",
            p.shape()
        )));
    }
    Ok(p.as_array().iter().copied().collect())
}
