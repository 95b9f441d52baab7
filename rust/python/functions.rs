//! The module-level functions. Each has the same three beats: extract owned Rust values, run the
//! engine through [`run`] (GIL released), map the error. Results are plain Python data.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::io::Model;
use crate::layout::{Layout, BUILTIN_LAYOUTS};
use crate::open;
use crate::python::convert::to_py;
use crate::python::errors::invalid_option;
use crate::python::progress::run;
use crate::python::session::extract_layout;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(builtin_layouts, m)?)?;
    m.add_function(wrap_pyfunction!(checksums, m)?)?;
    Ok(())
}

/// Opens one model and reports its tensors and detected layout.
///
/// Args:
///     model: folder or .safetensors file.
///     architecture: config.json ``architectures[0]``, if known.
///     layout: a custom layout definition (the dict a layout file holds), overriding detection.
///
/// Returns:
///     ``{"layout", "description", "n_layers", "data_bytes", "shards", "tensors": [{"name", "dtype",
///     "shape", "place"}]}``.
///
/// Raises:
///     InvalidModelError: unreadable model or no matching layout.
#[pyfunction]
#[pyo3(signature = (model, architecture=None, layout=None))]
fn inspect<'py>(
    py: Python<'py>,
    model: PathBuf,
    architecture: Option<String>,
    layout: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let custom = extract_layout(layout)?;
    let value = run(py, None, move |_| {
        let m = Model::open(&model)?;
        let names: Vec<&str> = m.tensors.keys().map(String::as_str).collect();
        let layout = Layout::detect(&names, architecture.as_deref(), custom.as_ref())
            .map_err(|e| e.in_model(&model))?;
        open::measured_are_floats(&m, &layout)?;
        let tensors: Vec<serde_json::Value> = m
            .tensors
            .iter()
            .map(|(n, t)| serde_json::json!({"name": n, "dtype": t.dtype, "shape": t.shape, "place": layout.place(n)}))
            .collect();
        Ok(serde_json::json!({
            "layout": layout.def.name,
            "description": layout.def.description,
            "n_layers": layout.n_layers,
            "data_bytes": m.data_bytes(),
            "shards": m.shards.len(),
            "tensors": tensors,
        }))
    })?;
    to_py(py, &value)
}

/// The built-in layout definitions, as ``{name: definition}`` (the dict a layout file holds).
#[pyfunction]
fn builtin_layouts(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, text) in BUILTIN_LAYOUTS {
        let value: serde_json::Value = serde_json::from_str(text).expect("built-in layouts are JSON");
        d.set_item(*name, to_py(py, &value)?)?;
    }
    Ok(d)
}

/// Checksums of files (``xxh3-8m:`` + 16 hex digits each), hashed in parallel blocks.
///
/// Args:
///     paths: the files.
///     threads: worker threads.
///
/// Returns:
///     One checksum per file, in order.
///
/// Raises:
///     OSError: a file cannot be read.
#[pyfunction]
#[pyo3(signature = (paths, threads))]
fn checksums(py: Python<'_>, paths: Vec<PathBuf>, threads: usize) -> PyResult<Vec<String>> {
    if threads == 0 {
        return Err(invalid_option("threads must be at least 1"));
    }
    run(py, None, move |p| {
        crate::budget::run_pool(threads, || {
            paths
                .iter()
                .map(|f| crate::checksum::file_checksum(f, p))
                .collect()
        })?
    })
}
