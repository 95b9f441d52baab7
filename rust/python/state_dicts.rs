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
use crate::options::MergeOptions;
use crate::python::dlpack::region;
use crate::python::errors::to_py;
use crate::python::progress::run;
use crate::python::session::extract_layout;
use crate::python::types::{PyPlan, PyWriteSummary};

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
///     options: a ``MergeOptions``.
///     architecture: config.json ``architectures[0]``, if known.
///     layout: a custom layout definition (the dict a layout file holds), overriding detection.
///     allocate: ``allocate([(name, dtype, shape)]) -> [capsule]``, called once (with the GIL) after
///         the analysis with the output tensors in order; returns a writable, contiguous CPU buffer
///         of exactly that dtype and shape for each, which the write pass fills. None: analyse only.
///     progress: called as ``progress(phase, done, total)`` about ten times a second.
///
/// Returns:
///     ``(plan, write)``: the :class:`Plan`, and the :class:`WriteSummary` (None without ``allocate``).
///
/// Raises:
///     InvalidModelError, IncompatibleModelsError, NonFiniteTensorError, MemoryBudgetError,
///     InvalidOptionError, KeyboardInterrupt, and whatever ``allocate`` raises.
#[pyfunction]
#[pyo3(signature = (base, safety, expert, options, architecture=None, layout=None, allocate=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn merge_state_dicts(
    py: Python<'_>,
    base: Vec<Entry>,
    safety: Vec<Entry>,
    expert: Vec<Entry>,
    options: MergeOptions,
    architecture: Option<String>,
    layout: Option<&Bound<'_, PyAny>>,
    allocate: Option<Py<PyAny>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(PyPlan, Option<PyWriteSummary>)> {
    let custom = extract_layout(layout)?;
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
        return Ok((PyPlan(plan), None));
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
    Ok((PyPlan(plan), Some(PyWriteSummary(write))))
}
