//! The frozen Python classes for the engine's values: [`Plan`] (one language expert's decisions),
//! [`UnitDecision`], [`TensorStats`], [`WriteSummary`] and [`Sums`] (one share of an analyze pass
//! split across machines, with the stamps of the files it read). Each wraps the engine value itself;
//! `to_dict` and `from_dict` convert through the engine's serde form, so the report and the classes
//! cannot drift apart. They pickle (by their dict form), so they can be sent to other processes.
//!
//! [`Plan`]: PyPlan
//! [`UnitDecision`]: PyUnitDecision
//! [`TensorStats`]: PyTensorStats
//! [`WriteSummary`]: PyWriteSummary
//! [`Sums`]: PySums

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple, PyType};
use serde::{Deserialize, Serialize};

use crate::analyze::{self, sums, Decision, Measured};
use crate::io::Stamp;
use crate::options::MergeOptions;
use crate::python::convert::{from_data, from_py, to_data};
use crate::python::errors::{invalid_option, to_py};
use crate::write;

fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Safety => "safety",
        Decision::Expert => "expert",
        Decision::Blend => "blend",
    }
}

type Reduced<'py> = (Bound<'py, PyAny>, (Bound<'py, PyAny>,));

/// `(cls.from_dict, (obj.to_dict(),))`: how every class here pickles.
fn reduce_by_dict<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Reduced<'py>> {
    Ok((
        obj.get_type().getattr("from_dict")?,
        (obj.call_method0("to_dict")?,),
    ))
}

/// One unit (a decoder layer, or its attention or MLP) and what was decided for it.
///
/// Attributes:
///     layer: decoder layer index.
///     part: ``None`` for a whole layer, ``"attention"`` or ``"mlp"`` in module granularity.
///     score_safety, score_expert: raw scores A_S(u), A_M(u).
///     p_safety, p_expert: normalised scores p_S(u), p_M(u).
///     d: p_S − p_M.
///     decision: ``"safety"``, ``"expert"`` or ``"blend"``.
///     alpha: the safety expert's weight of a blend with a weight of its own, else ``None`` (a blend
///         then takes the run's alpha).
///     source: who decided: ``"measured"`` (d and tau), ``"band"``, ``"file"`` or ``"override"``.
#[pyclass(name = "UnitDecision", module = "layerswap_fast", frozen, eq)]
#[derive(Clone, PartialEq)]
pub(crate) struct PyUnitDecision(pub(crate) analyze::UnitDecision);

#[pymethods]
impl PyUnitDecision {
    #[getter]
    fn layer(&self) -> usize {
        self.0.unit.layer
    }
    #[getter]
    fn part<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_data(py, &self.0.unit.part)
    }
    #[getter]
    fn score_safety(&self) -> f64 {
        self.0.score_safety
    }
    #[getter]
    fn score_expert(&self) -> f64 {
        self.0.score_expert
    }
    #[getter]
    fn p_safety(&self) -> f64 {
        self.0.p_safety
    }
    #[getter]
    fn p_expert(&self) -> f64 {
        self.0.p_expert
    }
    #[getter]
    fn d(&self) -> f64 {
        self.0.d
    }
    #[getter]
    fn decision(&self) -> &'static str {
        decision_name(self.0.decision)
    }
    #[getter]
    fn alpha(&self) -> Option<f64> {
        self.0.alpha
    }
    #[getter]
    fn source<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_data(py, &self.0.source)
    }
    /// ``"layer 3"`` or ``"layer 3 mlp"``.
    #[getter]
    fn label(&self) -> String {
        match serde_json::to_value(self.0.unit.part).expect("parts serialise") {
            serde_json::Value::String(p) => format!("layer {} {p}", self.0.unit.layer),
            _ => format!("layer {}", self.0.unit.layer),
        }
    }
    /// The unit as the report writes it.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_data(py, &self.0)
    }
    /// The inverse of :meth:`to_dict`.
    #[classmethod]
    fn from_dict(_cls: &Bound<'_, PyType>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let u: analyze::UnitDecision = from_data(data, "unit decision")?;
        if let Some(a) = u.alpha.filter(|a| !(0.0..=1.0).contains(a)) {
            return Err(invalid_option(format!(
                "invalid unit decision: layer {}: blend weight {a} is not between 0 and 1",
                u.unit.layer
            )));
        }
        Ok(Self(u))
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        reduce_by_dict(slf.as_any())
    }
    fn __repr__(&self) -> String {
        format!(
            "UnitDecision({}, decision={:?}, d={:+.6})",
            self.label(),
            self.decision(),
            self.0.d
        )
    }
}

/// Sums of squares of one measured tensor: Σ B², Σ (S − B)² and Σ (M − B)².
#[pyclass(name = "TensorStats", module = "layerswap_fast", frozen, eq)]
#[derive(Clone, PartialEq)]
pub(crate) struct PyTensorStats(pub(crate) analyze::TensorStats);

#[pymethods]
impl PyTensorStats {
    #[getter]
    fn name(&self) -> &str {
        &self.0.name
    }
    #[getter]
    fn numel(&self) -> u64 {
        self.0.numel
    }
    #[getter]
    fn base_ss(&self) -> f64 {
        self.0.base_ss
    }
    #[getter]
    fn safety_ss(&self) -> f64 {
        self.0.safety_ss
    }
    #[getter]
    fn expert_ss(&self) -> f64 {
        self.0.expert_ss
    }
    /// ``(safety_ss, expert_ss)``.
    #[getter]
    fn diff_ss(&self) -> (f64, f64) {
        (self.0.safety_ss, self.0.expert_ss)
    }
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_data(py, &self.0)
    }
    #[classmethod]
    fn from_dict(_cls: &Bound<'_, PyType>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(Self(from_data(data, "tensor statistics")?))
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        reduce_by_dict(slf.as_any())
    }
    fn __repr__(&self) -> String {
        format!("TensorStats({:?}, numel={})", self.0.name, self.0.numel)
    }
}

/// Decisions for one language expert.
///
/// Attributes:
///     options: the engine options the plan was made with (granularity, tau, alpha, numerics, ...).
///     layout: name of the detected layout.
///     n_layers: number of decoder layers.
///     granularity: ``"layer"`` or ``"module"``.
///     units: one :class:`UnitDecision` per unit, in order.
///     stats: the per-tensor statistics behind the scores.
#[pyclass(name = "Plan", module = "layerswap_fast", frozen, eq)]
#[derive(Clone, PartialEq)]
pub(crate) struct PyPlan(pub(crate) analyze::Plan);

#[pymethods]
impl PyPlan {
    #[getter]
    fn options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_data(py, &self.0.options)
    }
    #[getter]
    fn layout(&self) -> &str {
        &self.0.layout
    }
    #[getter]
    fn n_layers(&self) -> usize {
        self.0.n_layers
    }
    #[getter]
    fn granularity<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_data(py, &self.0.options.granularity)
    }
    #[getter]
    fn units<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.0.units.iter().map(|u| PyUnitDecision(u.clone())))
    }
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.0.stats.iter().map(|s| PyTensorStats(s.clone())))
    }
    /// The decision of every unit, in unit order.
    fn decisions(&self) -> Vec<&'static str> {
        self.0.units.iter().map(|u| decision_name(u.decision)).collect()
    }
    /// Units per decision: ``{"safety": n, "expert": n, "blend": n}``.
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for decision in [Decision::Safety, Decision::Expert, Decision::Blend] {
            let n = self.0.units.iter().filter(|u| u.decision == decision).count();
            d.set_item(decision_name(decision), n)?;
        }
        Ok(d)
    }
    /// ``{"options", "layout", "n_layers", "units"}``, and ``"stats"`` when ``with_stats``.
    #[pyo3(signature = (with_stats = false))]
    fn to_dict<'py>(&self, py: Python<'py>, with_stats: bool) -> PyResult<Bound<'py, PyAny>> {
        let d = to_data(py, &self.0)?;
        if !with_stats {
            d.del_item("stats")?;
        }
        Ok(d)
    }
    /// The inverse of :meth:`to_dict`. ``options`` may also be a ``MergeOptions``. The statistics
    /// come from ``data["stats"]`` when it has them, else from ``stats``.
    ///
    /// Raises:
    ///     InvalidOptionError: not a plan: a field missing or of the wrong type, bad options, units
    ///         that are not those of the granularity, a blend weight outside [0, 1].
    #[classmethod]
    #[pyo3(signature = (data, stats = None))]
    fn from_dict(
        _cls: &Bound<'_, PyType>,
        data: &Bound<'_, PyAny>,
        stats: Option<Vec<PyRef<'_, PyTensorStats>>>,
    ) -> PyResult<Self> {
        let Ok(dict) = data.cast::<PyDict>() else {
            let kind = data.get_type().name()?;
            return Err(invalid_option(format!(
                "invalid plan: a dict is expected, not {kind}"
            )));
        };
        let mut value = serde_json::Map::new();
        for (k, v) in dict.iter() {
            let key: String = k.extract()?;
            let field = if key == "options" && !v.is_instance_of::<PyDict>() {
                let options: MergeOptions = v.extract()?;
                serde_json::to_value(options).expect("options serialise")
            } else {
                from_py(&v)?
            };
            value.insert(key, field);
        }
        if !value.contains_key("stats") {
            let given: Vec<analyze::TensorStats> =
                stats.unwrap_or_default().iter().map(|s| s.0.clone()).collect();
            value.insert(
                "stats".into(),
                serde_json::to_value(given).expect("stats serialise"),
            );
        }
        let plan: analyze::Plan = serde_json::from_value(serde_json::Value::Object(value))
            .map_err(|e| invalid_option(format!("invalid plan: {e}")))?;
        plan.options.validate().map_err(to_py)?;
        plan.check().map_err(to_py)?;
        Ok(Self(plan))
    }
    /// The plan without its statistics (as :meth:`to_dict` gives it) as JSON text, as ``json.dumps``
    /// writes it; :meth:`from_json` reads it back exactly.
    #[pyo3(signature = (indent = 2))]
    fn to_json(&self, py: Python<'_>, indent: Option<usize>) -> PyResult<String> {
        let kwargs = PyDict::new(py);
        kwargs.set_item("indent", indent)?;
        py.import("json")?
            .call_method("dumps", (self.to_dict(py, false)?,), Some(&kwargs))?
            .extract()
    }
    /// The inverse of :meth:`to_json`.
    #[classmethod]
    fn from_json(cls: &Bound<'_, PyType>, text: &str) -> PyResult<Self> {
        let data = cls
            .py()
            .import("json")?
            .call_method1("loads", (text,))
            .map_err(|e| invalid_option(format!("invalid plan: not JSON ({e})")))?;
        Self::from_dict(cls, &data, None)
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        let d = slf.get().to_dict(slf.py(), true)?;
        Ok((slf.get_type().getattr("from_dict")?, (d,)))
    }
    fn __repr__(&self) -> String {
        format!(
            "Plan(layout={:?}, n_layers={}, units={})",
            self.0.layout,
            self.0.n_layers,
            self.0.units.len()
        )
    }
}

/// What writing one language expert did.
///
/// Attributes:
///     files: the files written (shards and index), inside the output folder.
///     tensors: output tensors.
///     bytes_written: bytes of tensor data written (all of it, less what was cloned).
///     bytes_cloned: bytes shared with an input's blocks instead of written (copy-on-write file
///         systems only).
///     seconds: time spent.
///     expert_only: tensors outside the layers that only the language expert has, copied from it.
#[pyclass(name = "WriteSummary", module = "layerswap_fast._core", frozen)]
pub(crate) struct PyWriteSummary(pub(crate) write::WriteSummary);

#[pymethods]
impl PyWriteSummary {
    #[getter]
    fn files(&self) -> Vec<String> {
        self.0.files.iter().map(|f| f.display().to_string()).collect()
    }
    #[getter]
    fn tensors(&self) -> usize {
        self.0.tensors
    }
    #[getter]
    fn bytes_written(&self) -> u64 {
        self.0.bytes_written
    }
    #[getter]
    fn bytes_cloned(&self) -> u64 {
        self.0.bytes_cloned
    }
    #[getter]
    fn seconds(&self) -> f64 {
        self.0.seconds
    }
    #[getter]
    fn expert_only(&self) -> Vec<String> {
        self.0.expert_only.clone()
    }
    /// ``{"files", "tensors", "bytes_written", "bytes_cloned", "seconds", "expert_only"}``.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_data(py, &self.0)
    }
}

/// A file's stamp, as the serde form of [`PySums`] holds it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
struct FileStamp {
    path: PathBuf,
    #[serde(flatten)]
    stamp: Stamp,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum MeasuredName {
    Safety,
    Expert,
}

/// The serde form of [`PySums`].
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Share {
    measured: MeasuredName,
    tensors: Vec<sums::Sums>,
    stamps: Vec<FileStamp>,
}

/// One share of an analyze pass split across machines: Σ B² and Σ (X − B)² of every measured
/// tensor for one model X (the safety expert, or one language expert), and the stamps (device,
/// inode, size, modification time) of the files read for them, so that the write that uses them can
/// prove it reads the same files (``Session.check_stamps``).
///
/// Attributes:
///     measured: ``"safety"`` or ``"expert"``.
///     files: the files whose stamps it carries.
#[pyclass(name = "Sums", module = "layerswap_fast._core", frozen, eq)]
#[derive(Clone, PartialEq)]
pub(crate) struct PySums(pub(crate) Share);

impl PySums {
    pub(crate) fn new(measured: Measured, tensors: Vec<sums::Sums>, stamps: Vec<(PathBuf, Stamp)>) -> Self {
        PySums(Share {
            measured: match measured {
                Measured::Safety => MeasuredName::Safety,
                Measured::Expert(_) => MeasuredName::Expert,
            },
            tensors,
            stamps: stamps
                .into_iter()
                .map(|(path, stamp)| FileStamp { path, stamp })
                .collect(),
        })
    }
    pub(crate) fn is_safety(&self) -> bool {
        self.0.measured == MeasuredName::Safety
    }
    pub(crate) fn tensors(&self) -> &[sums::Sums] {
        &self.0.tensors
    }
    pub(crate) fn stamps(&self) -> impl Iterator<Item = (PathBuf, Stamp)> + '_ {
        self.0.stamps.iter().map(|s| (s.path.clone(), s.stamp))
    }
}

#[pymethods]
impl PySums {
    #[getter]
    fn measured<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_data(py, &self.0.measured)
    }
    #[getter]
    fn files(&self) -> Vec<String> {
        self.0
            .stamps
            .iter()
            .map(|s| s.path.display().to_string())
            .collect()
    }
    /// ``{"measured", "tensors": [{"name", "numel", "base_ss", "diff_ss": [x]}], "stamps": [{"path",
    /// "dev", "ino", "len", "mtime_ns"}]}``.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_data(py, &self.0)
    }
    /// The inverse of :meth:`to_dict` (``stamps`` may be empty: saved statistics carry none).
    #[classmethod]
    fn from_dict(_cls: &Bound<'_, PyType>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(Self(from_data(data, "sums")?))
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        reduce_by_dict(slf.as_any())
    }
    fn __repr__(&self) -> String {
        format!(
            "Sums({}, tensors={}, files={})",
            if self.is_safety() { "safety" } else { "expert" },
            self.0.tensors.len(),
            self.0.stamps.len()
        )
    }
}
