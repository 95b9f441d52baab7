//! `merge_state_dicts`: a merge of three state dicts held by Python, through the engine's memory
//! backend (inputs read in place) and memory sink (outputs the caller allocated, filled in place).
//! Same three beats as every binding function: extract (DLPack capsules to memory regions, with the
//! GIL), run the engine with the GIL released, map the error.

use std::path::Path;

use pyo3::prelude::*;

use crate::dtype::Dtype;
use crate::error::Error;
use crate::io::{MemoryRegion, Model};
use crate::open;
use crate::python::dlpack::region;
use crate::python::errors::to_py;
use crate::python::functions::{parse_layout, parse_options};
use crate::python::progress::run;

/// One tensor as Python hands it over: name, safetensors dtype name, shape, DLPack capsule.
type Entry = (String, String, Vec<u64>, Py<PyAny>);

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge_state_dicts, m)?)?;
    Ok(())
}

fn dtype(label: &str, name: &str, text: &str) -> PyResult<Dtype> {
    Dtype::parse(text).ok_or_else(|| {
        to_py(Error::invalid(
            label,
            format!("tensor '{name}': unknown dtype {text}"),
        ))
    })
}

fn model(py: Python<'_>, label: &str, entries: &[Entry]) -> PyResult<Model> {
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, dt, shape, capsule) in entries {
        let dt = dtype(label, name, dt)?;
        tensors.push((
            name.clone(),
            dt,
            shape.clone(),
            region(label, name, dt, shape, capsule.bind(py), false)?,
        ));
    }
    Model::from_memory(Path::new(label), tensors).map_err(to_py)
}

/// Analyses, and with ``allocate`` merges, three state dicts held in memory.
///
/// Args:
///     base, safety, expert: ``[(name, dtype, shape, capsule)]``: every tensor's safetensors dtype
///         name, shape and DLPack capsule (``tensor.__dlpack__()``); the engine reads the memory in
///         place. The capsules must stay referenced, and the tensors unchanged, during the call.
///     options_json: MergeOptions as JSON.
///     architecture: config.json ``architectures[0]``, if known.
///     layout_json: a custom layout definition (JSON text), overriding detection.
///     allocate: ``allocate([(name, dtype, shape)]) -> [capsule]``, called once (with the GIL) after
///         the analysis with the output tensors in order; returns a writable, contiguous CPU buffer
///         of exactly that dtype and shape for each, which the write pass fills. None: analyse only.
///     progress: called as ``progress(phase, done, total)`` about ten times a second.
///
/// Returns:
///     JSON text: ``{"plan": {...}, "write": {...} or null}``.
///
/// Raises:
///     InvalidModelError, IncompatibleModelsError, NonFiniteTensorError, MemoryBudgetError,
///     InvalidOptionError, KeyboardInterrupt, and whatever ``allocate`` raises.
#[pyfunction]
#[pyo3(signature = (base, safety, expert, options_json, architecture=None, layout_json=None, allocate=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn merge_state_dicts(
    py: Python<'_>,
    base: Vec<Entry>,
    safety: Vec<Entry>,
    expert: Vec<Entry>,
    options_json: &str,
    architecture: Option<String>,
    layout_json: Option<String>,
    allocate: Option<Py<PyAny>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let options = parse_options(options_json)?;
    let custom = parse_layout(layout_json)?;
    // `base`, `safety` and `expert` hold the capsules, and so the memory, until this function returns.
    let models = (
        model(py, "base state dict", &base)?,
        model(py, "safety state dict", &safety)?,
        model(py, "expert state dict", &expert)?,
    );
    let tick = progress.as_ref().map(|p| p.clone_ref(py));
    let (session, plan) = run(py, tick, move |p| {
        let session = open::from_models(
            models.0,
            models.1,
            vec![models.2],
            architecture.as_deref(),
            custom.as_ref(),
        )?;
        let plan = session.analyze(&options, p)?.remove(0);
        Ok((session, plan))
    })?;
    let Some(allocate) = allocate else {
        return Ok(serde_json::json!({"plan": plan, "write": null}).to_string());
    };
    let outputs = session.outputs(0, &plan).map_err(to_py)?;
    let specs: Vec<(String, String, Vec<u64>)> = outputs
        .iter()
        .map(|(n, d, s)| (n.clone(), d.to_string(), s.clone()))
        .collect();
    let capsules: Vec<Py<PyAny>> = allocate.call1(py, (specs,))?.extract(py)?;
    if capsules.len() != outputs.len() {
        return Err(to_py(Error::argument(format!(
            "allocate returned {} buffers for {} tensors",
            capsules.len(),
            outputs.len()
        ))));
    }
    let regions = outputs
        .iter()
        .zip(&capsules)
        .map(|((name, dt, shape), c)| region("merged state dict", name, *dt, shape, c.bind(py), true))
        .collect::<PyResult<Vec<MemoryRegion>>>()?;
    // `capsules` keeps the output memory alive until the write is done.
    let write = run(py, progress, |p| session.write_memory(0, &plan, regions, p))?;
    Ok(serde_json::json!({"plan": plan, "write": write}).to_string())
}
