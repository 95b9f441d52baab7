//! `#[pyfunction]`s. Each has the same three beats: extract owned Rust values, run the engine through
//! [`run`] (GIL released), map the error. Results are JSON strings.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::analyze::sums::Sums;
use crate::analyze::TensorStats;
use crate::error::Error;
use crate::io::Model;
use crate::layout::{Layout, LayoutDef, BUILTIN_LAYOUTS};
use crate::open;
use crate::options::MergeOptions;
use crate::python::errors::{kind_name, to_py};
use crate::python::progress::run;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    m.add_function(wrap_pyfunction!(sums, m)?)?;
    m.add_function(wrap_pyfunction!(plans_from_sums, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(write, m)?)?;
    m.add_function(wrap_pyfunction!(builtin_layouts, m)?)?;
    m.add_function(wrap_pyfunction!(checksums, m)?)?;
    Ok(())
}

pub(crate) fn parse_options(options_json: &str) -> PyResult<MergeOptions> {
    let options: MergeOptions = serde_json::from_str(options_json)
        .map_err(|e| to_py(Error::argument(format!("invalid options: {e}"))))?;
    options.validate().map_err(to_py)?;
    Ok(options)
}

pub(crate) fn parse_layout(layout_json: Option<String>) -> PyResult<Option<LayoutDef>> {
    layout_json
        .map(|t| LayoutDef::from_json(&t))
        .transpose()
        .map_err(to_py)
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
fn inspect(
    py: Python<'_>,
    model: PathBuf,
    architecture: Option<String>,
    layout_json: Option<String>,
) -> PyResult<String> {
    let custom = parse_layout(layout_json)?;
    run(py, None, move |_| {
        let m = Model::open(&model)?;
        let names: Vec<&str> = m.tensors.keys().map(std::string::String::as_str).collect();
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
        })
        .to_string())
    })
}

/// Opens B, S and the experts and analyzes every expert in one pass: one plan per expert.
///
/// Args:
///     base, safety: folders or files of B and S.
///     experts: language experts M (one or more).
///     options_json: MergeOptions as JSON: one for all experts, or a list with one per expert.
///     architecture, layout_json: as for ``inspect``.
///     saved_stats_json: statistics of an earlier run (a plan's ``stats``) whose safety-expert sums
///         are reused instead of reading S again.
///     lenient: an expert that cannot be opened or does not fit B and S is reported in ``failures``
///         instead of failing the call.
///     progress: called as ``progress(phase, done, total)`` about ten times a second.
///
/// Returns:
///     JSON text: ``{"plans": [plan or null per expert], "failures": [{"index", "kind", "message"}],
///     "sources": {"safety": info, "experts": [info or null per expert]}}``; an info says whether the
///     expert is a full model or a LoRA adapter (``kind``, ``rank``, ``stats_source``...).
///
/// Raises:
///     InvalidModelError, IncompatibleModelsError, MemoryBudgetError, InvalidOptionError, OSError.
#[pyfunction]
#[pyo3(signature = (base, safety, experts, options_json, architecture=None, layout_json=None, saved_stats_json=None, lenient=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn analyze(
    py: Python<'_>,
    base: PathBuf,
    safety: PathBuf,
    experts: Vec<PathBuf>,
    options_json: Vec<String>,
    architecture: Option<String>,
    layout_json: Option<String>,
    saved_stats_json: Option<String>,
    lenient: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let options = options_json
        .iter()
        .map(|o| parse_options(o))
        .collect::<PyResult<Vec<_>>>()?;
    if options.len() != 1 && options.len() != experts.len() {
        return Err(to_py(Error::argument(format!(
            "{} option sets for {} experts",
            options.len(),
            experts.len()
        ))));
    }
    let custom = parse_layout(layout_json)?;
    let saved: Option<Vec<TensorStats>> = saved_stats_json
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| to_py(Error::argument(format!("saved statistics are not valid: {e}"))))?;
    run(py, progress, move |p| {
        let refs: Vec<&std::path::Path> = experts.iter().map(std::path::PathBuf::as_path).collect();
        let (session, outcomes) =
            open::open_lenient(&base, &safety, &refs, architecture.as_deref(), custom.as_ref())?;
        let mut failures = vec![];
        let mut kept_options = vec![];
        let mut kept_info = session.experts.iter().map(super::super::expert::Expert::info);
        for (i, o) in outcomes.into_iter().enumerate() {
            match o {
                Ok(_) => kept_options.push(options[if options.len() == 1 { 0 } else { i }].clone()),
                Err(e) if lenient => failures
                    .push(serde_json::json!({"index": i, "kind": kind_name(&e), "message": e.to_string()})),
                Err(e) => return Err(e),
            }
        }
        let plans = session.analyze_each(&kept_options, saved.as_deref(), p)?;
        let failed: std::collections::HashSet<u64> =
            failures.iter().map(|f| f["index"].as_u64().unwrap()).collect();
        let mut it = plans.into_iter();
        let all: Vec<Option<crate::analyze::Plan>> = (0..experts.len() as u64)
            .map(|i| if failed.contains(&i) { None } else { it.next() })
            .collect();
        let info: Vec<Option<crate::expert::ExpertInfo>> = (0..experts.len() as u64)
            .map(|i| {
                if failed.contains(&i) {
                    None
                } else {
                    kept_info.next()
                }
            })
            .collect();
        Ok(serde_json::json!({"plans": all, "failures": failures, "sources": {"safety": session.safety.info(), "experts": info}}).to_string())
    })
}

/// One share of a statistics pass split across machines: the sums of B and one model.
///
/// Args:
///     base, safety, expert: folders or files of B, S and one language expert M (opened and checked
///         together; only B and the measured model are read).
///     measured: ``"safety"`` (sums of S against B) or ``"expert"`` (sums of M against B).
///     options_json: MergeOptions as JSON (numerics, memory, threads).
///     architecture, layout_json, progress: as for ``analyze``.
///
/// Returns:
///     JSON text: a list of ``{"name", "numel", "base_ss", "diff_ss": [x]}``, one per measured tensor.
///
/// Raises:
///     as ``analyze``.
#[pyfunction]
#[pyo3(signature = (base, safety, expert, measured, options_json, architecture=None, layout_json=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn sums(
    py: Python<'_>,
    base: PathBuf,
    safety: PathBuf,
    expert: PathBuf,
    measured: &str,
    options_json: &str,
    architecture: Option<String>,
    layout_json: Option<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let which = match measured {
        "safety" => crate::analyze::Measured::Safety,
        "expert" => crate::analyze::Measured::Expert(0),
        other => {
            return Err(to_py(Error::argument(format!(
                "measured must be 'safety' or 'expert'; got {other:?}"
            ))))
        }
    };
    let options = parse_options(options_json)?;
    let custom = parse_layout(layout_json)?;
    run(py, progress, move |p| {
        let session = open::open(
            &base,
            &safety,
            &[expert.as_path()],
            architecture.as_deref(),
            custom.as_ref(),
        )?;
        let sums = session.sums_of(which, &options, p)?;
        Ok(serde_json::to_string(&sums).expect("json"))
    })
}

/// Plans from a statistics pass computed in shares by ``sums`` (or saved safety-expert statistics).
///
/// Args:
///     base, safety, experts: as for ``analyze`` (headers are read, no tensor data).
///     options_json: one MergeOptions JSON per expert.
///     safety_sums_json: the safety expert's share.
///     expert_sums_json: one share per expert, in order.
///     architecture, layout_json: as for ``analyze``.
///     lenient: an expert that cannot be opened or does not fit B, S and the first expert is
///         reported in ``failures`` instead of failing the call (as in ``analyze``).
///
/// Returns:
///     JSON text: ``{"plans": [plan or null per expert], "failures": [...], "sources": {...}}`` as
///     ``analyze`` returns them.
///
/// Raises:
///     InvalidOptionError: shares that do not fit this model or were computed from another base.
#[pyfunction]
#[pyo3(signature = (base, safety, experts, options_json, safety_sums_json, expert_sums_json, architecture=None, layout_json=None, lenient=false))]
#[allow(clippy::too_many_arguments)]
fn plans_from_sums(
    py: Python<'_>,
    base: PathBuf,
    safety: PathBuf,
    experts: Vec<PathBuf>,
    options_json: Vec<String>,
    safety_sums_json: &str,
    expert_sums_json: Vec<String>,
    architecture: Option<String>,
    layout_json: Option<String>,
    lenient: bool,
) -> PyResult<String> {
    let options = options_json
        .iter()
        .map(|o| parse_options(o))
        .collect::<PyResult<Vec<_>>>()?;
    if options.len() != experts.len() || expert_sums_json.len() != experts.len() {
        return Err(to_py(Error::argument(format!(
            "{} option sets and {} sets of sums for {} experts",
            options.len(),
            expert_sums_json.len(),
            experts.len()
        ))));
    }
    let custom = parse_layout(layout_json)?;
    let parse = |t: &str| -> PyResult<Vec<Sums>> {
        serde_json::from_str(t).map_err(|e| to_py(Error::argument(format!("sums are not valid: {e}"))))
    };
    let safety_sums = parse(safety_sums_json)?;
    let expert_sums = expert_sums_json
        .iter()
        .map(|t| parse(t))
        .collect::<PyResult<Vec<_>>>()?;
    run(py, None, move |_| {
        let refs: Vec<&std::path::Path> = experts.iter().map(std::path::PathBuf::as_path).collect();
        let (session, outcomes) =
            open::open_lenient(&base, &safety, &refs, architecture.as_deref(), custom.as_ref())?;
        let (mut failures, mut kept_options, mut kept_sums) = (vec![], vec![], vec![]);
        for (i, o) in outcomes.into_iter().enumerate() {
            match o {
                Ok(_) => {
                    kept_options.push(options[i].clone());
                    kept_sums.push(expert_sums[i].clone());
                }
                Err(e) if lenient => failures
                    .push(serde_json::json!({"index": i, "kind": kind_name(&e), "message": e.to_string()})),
                Err(e) => return Err(e),
            }
        }
        let plans = session.plans_from_shares(&kept_options, &safety_sums, &kept_sums)?;
        let failed: std::collections::HashSet<u64> =
            failures.iter().map(|f| f["index"].as_u64().unwrap()).collect();
        let mut it = plans.into_iter();
        let all: Vec<Option<crate::analyze::Plan>> = (0..experts.len() as u64)
            .map(|i| if failed.contains(&i) { None } else { it.next() })
            .collect();
        let mut kept_info = session.experts.iter().map(super::super::expert::Expert::info);
        let info: Vec<Option<crate::expert::ExpertInfo>> = (0..experts.len() as u64)
            .map(|i| {
                if failed.contains(&i) {
                    None
                } else {
                    kept_info.next()
                }
            })
            .collect();
        Ok(serde_json::json!({"plans": all, "failures": failures, "sources": {"safety": session.safety.info(), "experts": info}}).to_string())
    })
}

/// Writes one expert's merged model from its plan (made by ``analyze``), into ``out_dir``.
///
/// Args:
///     base, safety, expert: folders or files of B, S and M (B is only checked, not read).
///     out_dir: existing empty staging folder.
///     plan_json: one plan from ``analyze``'s result, as JSON.
///     architecture, layout_json, progress: as for ``analyze``.
///     sync: sync the files to disk before returning (False: the caller syncs before publishing).
///
/// Returns:
///     JSON text: the write summary ``{"files", "tensors", "bytes_written", "seconds"}``.
///
/// Raises:
///     as ``analyze``; OSError for a full disk.
#[pyfunction]
#[pyo3(signature = (base, safety, expert, out_dir, plan_json, architecture=None, layout_json=None, sync=true, progress=None))]
#[allow(clippy::too_many_arguments)]
fn write(
    py: Python<'_>,
    base: PathBuf,
    safety: PathBuf,
    expert: PathBuf,
    out_dir: PathBuf,
    plan_json: &str,
    architecture: Option<String>,
    layout_json: Option<String>,
    sync: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let plan: crate::analyze::Plan =
        serde_json::from_str(plan_json).map_err(|e| to_py(Error::argument(format!("invalid plan: {e}"))))?;
    plan.options.validate().map_err(to_py)?;
    let custom = parse_layout(layout_json)?;
    run(py, progress, move |p| {
        let session = open::open(
            &base,
            &safety,
            &[expert.as_path()],
            architecture.as_deref(),
            custom.as_ref(),
        )?;
        let write = session.write(0, &plan, &out_dir, sync, p)?;
        Ok(serde_json::to_string(&write).expect("json"))
    })
}

/// Analyses and writes one merged model into ``out_dir`` (an existing empty folder; the caller
/// renames it into place).
///
/// Args:
///     base, safety, expert: folders or files of B, S and M.
///     out_dir: empty staging folder to write shards (and index) into.
///     options_json, architecture, layout_json, progress: as for ``analyze``.
///     emit: ``"model"`` (a full model) or ``"adapter"`` (both experts LoRA: the merge as a PEFT
///         adapter file; ``write`` then also says what its adapter_config.json must hold).
///
/// Returns:
///     JSON text: ``{"plan": {...}, "write": {...}, "bytes_read": n, "sources": {"safety", "expert"}}``.
///
/// Raises:
///     InvalidModelError, IncompatibleModelsError, MemoryBudgetError, InvalidOptionError, OSError,
///     KeyboardInterrupt (Ctrl-C: the engine stops within one chunk).
#[pyfunction]
#[pyo3(signature = (base, safety, expert, out_dir, options_json, architecture=None, layout_json=None, progress=None, emit="model"))]
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
    emit: &str,
) -> PyResult<String> {
    let options = parse_options(options_json)?;
    let custom = parse_layout(layout_json)?;
    let adapter = match emit {
        "model" => false,
        "adapter" => true,
        other => {
            return Err(to_py(Error::argument(format!(
                "emit must be 'model' or 'adapter', got '{other}'"
            ))))
        }
    };
    run(py, progress, move |p| {
        let session = open::open(
            &base,
            &safety,
            &[expert.as_path()],
            architecture.as_deref(),
            custom.as_ref(),
        )?;
        if adapter && (session.safety.adapter().is_none() || session.experts[0].adapter().is_none()) {
            // Before the analyze pass, not after it.
            let full = if session.safety.adapter().is_none() {
                session.safety.path()
            } else {
                session.experts[0].path()
            };
            return Err(Error::argument(format!(
                "--emit adapter needs two LoRA adapter experts, but {} is a full model; write a full model instead",
                full.display()
            )));
        }
        let plans = session.analyze(&options, p)?;
        let write = if adapter {
            serde_json::to_value(session.emit_adapter(0, &plans[0], &out_dir, p)?).expect("json")
        } else {
            serde_json::to_value(session.write(0, &plans[0], &out_dir, true, p)?).expect("json")
        };
        Ok(serde_json::json!({
            "plan": plans[0],
            "write": write,
            "bytes_read": p.bytes_read.load(std::sync::atomic::Ordering::Relaxed),
            "sources": {"safety": session.safety.info(), "expert": session.experts[0].info()},
        })
        .to_string())
    })
}

/// The built-in layout definitions, as ``{name: json_text}``.
#[pyfunction]
fn builtin_layouts() -> Vec<(String, String)> {
    BUILTIN_LAYOUTS
        .iter()
        .map(|(n, t)| ((*n).to_string(), (*t).to_string()))
        .collect()
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
        return Err(to_py(Error::argument("threads must be at least 1")));
    }
    run(py, None, move |p| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::argument(format!("cannot start {threads} worker threads: {e}")))?;
        pool.install(|| {
            paths
                .iter()
                .map(|f| crate::checksum::file_checksum(f, p))
                .collect()
        })
    })
}
