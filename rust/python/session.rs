//! `Session`: B, S and the language experts opened once and checked, shared by the analysis and every
//! write, so that all of them read the same files and a file that changes in between is caught (each
//! write refuses to finish when an input's stamps changed since the session opened it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::analyze::{Measured, TensorStats};
use crate::error::Result;
use crate::layout::LayoutDef;
use crate::open;
use crate::options::MergeOptions;
use crate::progress::Progress;
use crate::python::convert::{from_data, to_data};
use crate::python::errors::{invalid_option, to_exception, to_py};
use crate::python::progress::run;
use crate::python::types::{PyPlan, PySums, PyTensorStats, PyWriteSummary};

/// A custom layout definition handed over as the dict a layout file holds.
pub(crate) fn extract_layout(layout: Option<&Bound<'_, PyAny>>) -> PyResult<Option<LayoutDef>> {
    let Some(layout) = layout.filter(|l| !l.is_none()) else {
        return Ok(None);
    };
    let value: serde_json::Value = from_data(layout, "layout definition")?;
    LayoutDef::from_json(&value.to_string()).map(Some).map_err(to_py)
}

/// B, S and the language experts, opened once and checked to fit together.
///
/// Args:
///     base, safety: folders or ``.safetensors`` files of B and S.
///     experts: the language experts M (one or more).
///     architecture: config.json ``architectures[0]`` of the first expert, if known.
///     layout: a custom layout definition (the dict a layout file holds), overriding detection.
///     lenient: an expert that cannot be opened or does not fit B and S is left out and listed in
///         ``failures`` instead of failing the session.
///
/// Raises:
///     InvalidModelError, IncompatibleModelsError, OSError.
#[pyclass(name = "Session", module = "layerswap_fast._core", frozen)]
pub(crate) struct PySession {
    inner: open::Session,
    /// Original index (in `experts` as given) of each opened expert.
    opened: Vec<usize>,
    failures: Vec<(usize, Py<PyAny>)>,
    bytes_read: AtomicU64,
}

impl PySession {
    fn slot(&self, expert: usize) -> PyResult<usize> {
        self.opened.iter().position(|&i| i == expert).ok_or_else(|| {
            invalid_option(format!(
                "expert {expert} is not open in this session (open: {:?})",
                self.opened
            ))
        })
    }

    /// Runs `work` on the session with the GIL released, and counts the bytes it read.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        progress: Option<Py<PyAny>>,
        work: impl FnOnce(&open::Session, &Progress) -> Result<T> + Send,
    ) -> PyResult<T> {
        run(py, progress, |p| {
            let out = work(&self.inner, p);
            self.bytes_read
                .fetch_add(p.bytes_read.load(Ordering::Relaxed), Ordering::Relaxed);
            out
        })
    }
}

#[pymethods]
impl PySession {
    #[new]
    #[pyo3(signature = (base, safety, experts, *, architecture=None, layout=None, lenient=false))]
    fn new(
        py: Python<'_>,
        base: PathBuf,
        safety: PathBuf,
        experts: Vec<PathBuf>,
        architecture: Option<String>,
        layout: Option<&Bound<'_, PyAny>>,
        lenient: bool,
    ) -> PyResult<Self> {
        let custom = extract_layout(layout)?;
        let (inner, outcomes) = run(py, None, move |_| {
            let refs: Vec<&std::path::Path> = experts.iter().map(PathBuf::as_path).collect();
            let (session, mut outcomes) =
                open::open_lenient(&base, &safety, &refs, architecture.as_deref(), custom.as_ref())?;
            if !lenient {
                if let Some(bad) = outcomes.iter().position(std::result::Result::is_err) {
                    return Err(outcomes.swap_remove(bad).unwrap_err());
                }
            }
            Ok((session, outcomes))
        })?;
        let mut opened = vec![];
        let mut failures = vec![];
        for (i, o) in outcomes.into_iter().enumerate() {
            match o {
                Ok(_) => opened.push(i),
                Err(e) => failures.push((i, to_exception(py, e))),
            }
        }
        Ok(PySession {
            inner,
            opened,
            failures,
            bytes_read: AtomicU64::new(0),
        })
    }

    /// Indexes (in ``experts`` as given) of the experts that opened, in order.
    #[getter]
    fn opened(&self) -> Vec<usize> {
        self.opened.clone()
    }

    /// ``(index, exception)`` of each expert left out of a lenient session.
    #[getter]
    fn failures(&self, py: Python<'_>) -> Vec<(usize, Py<PyAny>)> {
        self.failures.iter().map(|(i, e)| (*i, e.clone_ref(py))).collect()
    }

    /// Name of the layout the models share.
    #[getter]
    fn layout(&self) -> &str {
        &self.inner.layout.def.name
    }

    /// Decoder layers.
    #[getter]
    fn n_layers(&self) -> usize {
        self.inner.layout.n_layers
    }

    /// Whether each expert is a full model or a LoRA adapter (rank, where its sums come from):
    /// ``{"safety": info, "experts": [info per opened expert]}``.
    #[getter]
    fn sources<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let experts: Vec<_> = self
            .inner
            .experts
            .iter()
            .map(crate::expert::Expert::info)
            .collect();
        to_data(
            py,
            &serde_json::json!({"safety": self.inner.safety.info(), "experts": experts}),
        )
    }

    /// Bytes read from the inputs by every call so far.
    #[getter]
    fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Analyzes every opened expert in one pass over the models: one plan per expert of ``opened``.
    ///
    /// Args:
    ///     options: a ``MergeOptions`` for all experts, or a list with one per opened expert.
    ///     saved: statistics of an earlier analysis whose safety-expert sums are used instead of
    ///         reading S (B's sums must match them bit for bit).
    ///     progress: called as ``progress(phase, done, total)`` about ten times a second.
    ///     for_write: refuse now, before reading, vocabulary shapes that :meth:`write` would refuse
    ///         with these options (a merge fails early; an analysis alone does not depend on them).
    ///
    /// Raises:
    ///     NonFiniteTensorError, MemoryBudgetError, InvalidOptionError, OSError, KeyboardInterrupt.
    #[pyo3(signature = (options, *, saved=None, progress=None, for_write=false))]
    fn analyze(
        &self,
        py: Python<'_>,
        options: &Bound<'_, PyAny>,
        saved: Option<Vec<PyRef<'_, PyTensorStats>>>,
        progress: Option<Py<PyAny>>,
        for_write: bool,
    ) -> PyResult<Vec<PyPlan>> {
        let each: Vec<MergeOptions> =
            if options.is_instance_of::<PyList>() || options.is_instance_of::<PyTuple>() {
                options.extract()?
            } else {
                vec![options.extract()?; self.opened.len()]
            };
        let saved: Option<Vec<TensorStats>> = saved.map(|v| v.iter().map(|s| s.0.clone()).collect());
        let plans = self.run(py, progress, |s, p| {
            if for_write {
                s.check_vocab_each(&each)?;
            }
            s.analyze_each(&each, saved.as_deref(), p)
        })?;
        Ok(plans.into_iter().map(PyPlan).collect())
    }

    /// One share of an analyze pass split across machines: the sums of B and one model, with
    /// the stamps of the files read (see :class:`Sums`).
    ///
    /// Args:
    ///     measured: ``"safety"`` (S against B) or ``"expert"`` (expert ``expert`` against B).
    ///     options: a ``MergeOptions`` (numerics, memory, threads).
    ///     expert: the expert's index in ``experts`` as given.
    ///     progress: as for :meth:`analyze`.
    #[pyo3(signature = (measured, options, *, expert=0, progress=None))]
    fn sums(
        &self,
        py: Python<'_>,
        measured: &str,
        options: MergeOptions,
        expert: usize,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<PySums> {
        let which = match measured {
            "safety" => Measured::Safety,
            "expert" => Measured::Expert(self.slot(expert)?),
            other => {
                return Err(invalid_option(format!(
                    "measured must be 'safety' or 'expert'; got {other:?}"
                )))
            }
        };
        self.run(py, progress, |s, p| {
            let sums = s.sums_of(which, &options, p)?;
            Ok(PySums::new(which, sums, s.stamps_of(which)))
        })
    }

    /// Plans from an analyze pass computed in shares (:meth:`sums`, possibly elsewhere, or saved
    /// safety-expert statistics): one plan per opened expert, as :meth:`analyze` makes them.
    ///
    /// Args:
    ///     options: one ``MergeOptions`` per opened expert.
    ///     safety: the safety expert's share.
    ///     experts: one share per opened expert, in order.
    ///
    /// Raises:
    ///     InvalidOptionError: shares that do not fit this model or were computed from another base.
    fn plans_from_sums(
        &self,
        options: Vec<MergeOptions>,
        safety: PyRef<'_, PySums>,
        experts: Vec<PyRef<'_, PySums>>,
    ) -> PyResult<Vec<PyPlan>> {
        if !safety.is_safety() || experts.iter().any(|e| e.is_safety()) {
            return Err(invalid_option(
                "plans_from_sums takes the safety expert's share, then one share of each language expert",
            ));
        }
        let shares: Vec<Vec<_>> = experts.iter().map(|e| e.tensors().to_vec()).collect();
        let plans = self
            .inner
            .plans_from_shares(&options, safety.tensors(), &shares)
            .map_err(to_py)?;
        Ok(plans.into_iter().map(PyPlan).collect())
    }

    /// Refuses, naming the file, unless every file the shares ``sums`` read is an input of this
    /// session with the same stamp: the files were not changed or replaced since the sums were
    /// computed (on this machine or another one), so a plan made from them fits the bytes a
    /// :meth:`write` of this session reads.
    ///
    /// Raises:
    ///     InvalidModelError: a file changed; InvalidOptionError: a file is not an input here.
    fn check_stamps(&self, sums: Vec<PyRef<'_, PySums>>) -> PyResult<()> {
        let stamps: Vec<_> = sums.iter().flat_map(|s| s.stamps()).collect();
        self.inner.check_stamps(&stamps).map_err(to_py)
    }

    /// Writes expert ``expert``'s merged model, as ``plan`` decides it, into ``out`` (an existing,
    /// empty folder; the caller renames it into place).
    ///
    /// Args:
    ///     expert: the expert's index in ``experts`` as given.
    ///     plan: its plan (from :meth:`analyze`, or built with ``Plan.from_dict``).
    ///     out: the folder to write shards (and index) into.
    ///     sync: sync the files to disk before returning (False: the caller syncs before publishing).
    ///     progress: as for :meth:`analyze`.
    ///
    /// Raises:
    ///     InvalidModelError (an input changed since the session opened it), InvalidOptionError,
    ///     OSError (e.g. disk full), KeyboardInterrupt.
    #[pyo3(signature = (expert, plan, out, *, sync=true, progress=None))]
    fn write(
        &self,
        py: Python<'_>,
        expert: usize,
        plan: PyRef<'_, PyPlan>,
        out: PathBuf,
        sync: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<PyWriteSummary> {
        let slot = self.slot(expert)?;
        let plan = plan.0.clone();
        let summary = self.run(py, progress, |s, p| s.write(slot, &plan, &out, sync, p))?;
        Ok(PyWriteSummary(summary))
    }

    /// Writes expert ``expert``'s merge, as ``plan`` decides it, as a PEFT adapter file
    /// (``adapter_model.safetensors``) into ``out``; both experts must be LoRA adapters.
    ///
    /// Returns:
    ///     ``{"files", "tensors", "bytes_written", "seconds", "modules", "modules_to_save",
    ///     "fan_in_fan_out"}``: what the adapter's configuration must hold.
    ///
    /// Raises:
    ///     InvalidOptionError (a full-model expert, or a blend an adapter cannot hold), OSError.
    #[pyo3(signature = (expert, plan, out, *, progress=None))]
    fn emit_adapter<'py>(
        &self,
        py: Python<'py>,
        expert: usize,
        plan: PyRef<'_, PyPlan>,
        out: PathBuf,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let slot = self.slot(expert)?;
        let plan = plan.0.clone();
        let summary = self.run(py, progress, |s, p| s.emit_adapter(slot, &plan, &out, p))?;
        to_data(py, &summary)
    }

    /// Refuses, before any work, an adapter output for expert ``expert`` unless S and it are both
    /// LoRA adapters.
    fn check_adapters(&self, expert: usize) -> PyResult<()> {
        self.inner.check_adapters(self.slot(expert)?).map_err(to_py)
    }
}
