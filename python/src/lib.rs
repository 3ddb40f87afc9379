//! `moescope._native`: the moescope library's measures on numpy arrays.
//!
//! The Python package (`python/moescope/__init__.py`) turns its inputs
//! (lists, torch tensors, other dtypes) into C-contiguous f32/f64 arrays,
//! names the arguments and documents the formulas. This module checks shapes,
//! releases the GIL and calls the same library code the CLI runs. Reports
//! cross as JSON text (the CLI's own serialisation), numbers as numpy arrays.

mod arrays;
mod measures;
mod options;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// A library error as the Python exception a caller expects: bad input is a
/// `ValueError`, a file that cannot be read an `OSError`.
pub(crate) fn to_py(e: moescope::Error) -> PyErr {
    use moescope::Error;
    match e {
        Error::Io { .. } => PyOSError::new_err(e.to_string()),
        Error::Config { .. }
        | Error::Data(_)
        | Error::BadFile { .. }
        | Error::Checkpoint { .. } => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// A `ValueError` with `msg`.
pub(crate) fn bad(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(measures::weight_overlap, m)?)?;
    m.add_function(wrap_pyfunction!(measures::weight_chance, m)?)?;
    m.add_function(wrap_pyfunction!(measures::orth_loss, m)?)?;
    m.add_function(wrap_pyfunction!(measures::activation_overlap, m)?)?;
    m.add_function(wrap_pyfunction!(measures::routing_telemetry, m)?)?;
    m.add_function(wrap_pyfunction!(measures::jacobian_alignment, m)?)?;
    m.add_function(wrap_pyfunction!(measures::subspaces, m)?)?;
    m.add_function(wrap_pyfunction!(measures::analyze, m)?)?;
    m.add_function(wrap_pyfunction!(measures::read_metrics, m)?)?;
    m.add_function(wrap_pyfunction!(measures::bench_weight_overlap, m)?)?;
    m.add_function(wrap_pyfunction!(measures::bench_orth_loss, m)?)?;
    Ok(())
}
