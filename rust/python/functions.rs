//! `#[pyfunction]`s. Each has the same three beats: extract owned Rust values, run the engine through
//! [`run`] (GIL released), map the error. Results are JSON strings.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::error::Error;
use crate::io::Model;
use crate::layout::{Layout, LayoutDef, BUILTIN_LAYOUTS};
use crate::options::MergeOptions;
use crate::pipeline;
use crate::python::errors::to_py;
use crate::python::progress::run;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(builtin_layouts, m)?)?;
    Ok(())
}

fn parse_options(options_json: &str) -> PyResult<MergeOptions> {
    let options: MergeOptions =
        serde_json::from_str(options_json).map_err(|e| to_py(Error::argument(format!("invalid options: {e}"))))?;
    options.validate().map_err(to_py)?;
    Ok(options)
}

fn parse_layout(layout_json: Option<String>) -> PyResult<Option<LayoutDef>> {
    layout_json.map(|t| LayoutDef::from_json(&t)).transpose().map_err(to_py)
}

/// Opens one model and reports its tensors and detected layout.
///
/// Args:
///     model: folder or .safetensors file.
///     architecture: config.json ``architectures[0]``, if known.
///     layout_json: a custom layout definition (JSON text), overriding detection.
///
/// Returns:
///     JSON text: ``{"layout", "description", "n_layers", "tensors": [{"name", "dtype", "shape", "place"}]}``.
///
/// Raises:
///     InvalidModelError: unreadable model or no matching layout.
#[pyfunction]
#[pyo3(signature = (model, architecture=None, layout_json=None))]
fn inspect(py: Python<'_>, model: PathBuf, architecture: Option<String>, layout_json: Option<String>) -> PyResult<String> {
    let custom = parse_layout(layout_json)?;
    run(py, None, move |_| {
        let m = Model::open(&model)?;
        let names: Vec<&str> = m.tensors.keys().map(|s| s.as_str()).collect();
        let layout = Layout::detect(&names, architecture.as_deref(), custom.as_ref())?;
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
        })
        .to_string())
    })
}

/// Runs the statistics pass once for all experts and returns one plan per expert.
///
/// Args:
///     base, safety: folders or files of B and S.
///     experts: language experts M (one or more).
///     options_json: MergeOptions as JSON.
///     architecture, layout_json: as for ``inspect``.
///     progress: called as ``progress(phase, done, total)`` about ten times a second.
///
/// Returns:
///     JSON text: ``{"stats": [...], "plans": [...]}``.
///
/// Raises:
///     InvalidModelError, IncompatibleModelsError, MemoryBudgetError, InvalidOptionError, OSError.
#[pyfunction]
#[pyo3(signature = (base, safety, experts, options_json, architecture=None, layout_json=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn analyze(
    py: Python<'_>,
    base: PathBuf,
    safety: PathBuf,
    experts: Vec<PathBuf>,
    options_json: &str,
    architecture: Option<String>,
    layout_json: Option<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let options = parse_options(options_json)?;
    let custom = parse_layout(layout_json)?;
    run(py, progress, move |p| {
        let refs: Vec<&std::path::Path> = experts.iter().map(|e| e.as_path()).collect();
        let session = pipeline::open(&base, &safety, &refs, architecture.as_deref(), custom.as_ref())?;
        let (stats, plans) = session.analyze(&options, p)?;
        Ok(serde_json::json!({"stats": stats, "plans": plans}).to_string())
    })
}

/// Analyses and writes one merged model into ``out_dir`` (an existing empty folder; the caller
/// renames it into place).
///
/// Args:
///     base, safety, expert: folders or files of B, S and M.
///     out_dir: empty staging folder to write shards (and index) into.
///     options_json, architecture, layout_json, progress: as for ``analyze``.
///
/// Returns:
///     JSON text: ``{"plan": {...}, "stats": [...], "write": {...}, "bytes_read": n}``.
///
/// Raises:
///     InvalidModelError, IncompatibleModelsError, MemoryBudgetError, InvalidOptionError, OSError,
///     KeyboardInterrupt (Ctrl-C: the engine stops within one chunk).
#[pyfunction]
#[pyo3(signature = (base, safety, expert, out_dir, options_json, architecture=None, layout_json=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn merge(
    py: Python<'_>,
    base: PathBuf,
    safety: PathBuf,
    expert: PathBuf,
    out_dir: PathBuf,
    options_json: &str,
    architecture: Option<String>,
    layout_json: Option<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let options = parse_options(options_json)?;
    let custom = parse_layout(layout_json)?;
    run(py, progress, move |p| {
        let session = pipeline::open(&base, &safety, &[expert.as_path()], architecture.as_deref(), custom.as_ref())?;
        let (stats, plans) = session.analyze(&options, p)?;
        let write = session.write(0, &plans[0], &out_dir, p)?;
        Ok(serde_json::json!({
            "plan": plans[0],
            "stats": stats,
            "write": write,
            "bytes_read": p.bytes_read.load(std::sync::atomic::Ordering::Relaxed),
        })
        .to_string())
    })
}

/// The built-in layout definitions, as ``{name: json_text}``.
#[pyfunction]
fn builtin_layouts() -> Vec<(String, String)> {
    BUILTIN_LAYOUTS.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect()
}
