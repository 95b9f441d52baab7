//! The frozen Python classes for the engine's results: [`Plan`] (one language expert's decisions),
//! [`UnitDecision`], [`TensorStats`] and [`WriteSummary`]. Each wraps the engine value itself; `to_dict`
//! and `from_dict` convert through the engine's serde form, so the report and the classes cannot
//! drift apart. They pickle (by their dict or JSON form), so plans can be sent to other processes.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::analyze::{self, Decision};
use crate::layout::Part;
use crate::python::convert::{from_data, to_data};
use crate::python::errors::invalid_option;
use crate::write;

fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Safety => "safety",
        Decision::Expert => "expert",
        Decision::Blend => "blend",
    }
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
///     alpha: the safety expert's weight when the decision is ``"blend"``, else ``None``.
///     source: where the decision comes from: ``"measured"`` (thresholded from the scores).
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
    fn part(&self) -> Option<&'static str> {
        self.0.unit.part.map(|p| match p {
            Part::Attention => "attention",
            Part::Mlp => "mlp",
            Part::Norm => "norm",
        })
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
        match self.part() {
            None => format!("layer {}", self.0.unit.layer),
            Some(p) => format!("layer {} {p}", self.0.unit.layer),
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
        if u.alpha.is_some() != (u.decision == Decision::Blend) || u.alpha.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
            return Err(invalid_option(format!("unit {}: alpha must be between 0 and 1 for a blend and null otherwise", u.unit.layer)));
        }
        Ok(Self(u))
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyAny>,))> {
        Ok((slf.get_type().getattr("from_dict")?, (slf.get().to_dict(slf.py())?,)))
    }
    fn __repr__(&self) -> String {
        format!("UnitDecision({}, decision={:?}, d={:+.6})", self.label(), self.decision(), self.0.d)
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
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyAny>,))> {
        Ok((slf.get_type().getattr("from_dict")?, (slf.get().to_dict(slf.py())?,)))
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
            d.set_item(decision_name(decision), self.0.units.iter().filter(|u| u.decision == decision).count())?;
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
    /// The inverse of :meth:`to_dict` (``stats`` may be left out).
    #[classmethod]
    fn from_dict(_cls: &Bound<'_, PyType>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut value = crate::python::convert::from_py(data)?;
        if let Some(o) = value.as_object_mut() {
            o.entry("stats").or_insert_with(|| serde_json::Value::Array(vec![]));
        }
        let plan: analyze::Plan = serde_json::from_value(value).map_err(|e| invalid_option(format!("invalid plan: {e}")))?;
        plan.options.validate().map_err(crate::python::errors::to_py)?;
        for u in &plan.units {
            if u.alpha.is_some() != (u.decision == Decision::Blend) || u.alpha.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
                return Err(invalid_option(format!("invalid plan: unit {}: alpha must be between 0 and 1 for a blend and null otherwise", u.unit.layer)));
            }
        }
        Ok(Self(plan))
    }
    /// The whole plan, statistics included, as JSON text that :meth:`from_json` reads back exactly.
    #[pyo3(signature = (indent = 2))]
    fn to_json(&self, indent: Option<usize>) -> String {
        match indent {
            None => serde_json::to_string(&self.0).expect("plans serialise"),
            Some(n) => {
                let pad = vec![b' '; n];
                let mut out = vec![];
                let mut ser = serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(&pad));
                serde::Serialize::serialize(&self.0, &mut ser).expect("plans serialise");
                String::from_utf8(out).expect("JSON is UTF-8")
            }
        }
    }
    /// The inverse of :meth:`to_json`.
    #[classmethod]
    fn from_json(cls: &Bound<'_, PyType>, text: &str) -> PyResult<Self> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid_option(format!("invalid plan: {e}")))?;
        Self::from_dict(cls, &crate::python::convert::to_py(cls.py(), &value)?)
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        Ok((slf.get_type().getattr("from_json")?, (slf.get().to_json(None),)))
    }
    fn __repr__(&self) -> String {
        format!("Plan(layout={:?}, n_layers={}, units={})", self.0.layout, self.0.n_layers, self.0.units.len())
    }
}

/// What writing one language expert did.
///
/// Attributes:
///     files: the files written (shards and index), inside the output folder.
///     tensors: output tensors.
///     bytes_written: bytes of tensor data written.
///     seconds: time spent.
///     expert_only: tensors outside the layers that only the language expert has, copied from it.
#[pyclass(name = "WriteSummary", module = "layerswap_fast", frozen, get_all)]
pub(crate) struct PyWriteSummary {
    files: Vec<String>,
    tensors: usize,
    bytes_written: u64,
    seconds: f64,
    expert_only: Vec<String>,
}

impl From<write::WriteSummary> for PyWriteSummary {
    fn from(w: write::WriteSummary) -> Self {
        PyWriteSummary {
            files: w.files.iter().map(|f| f.display().to_string()).collect(),
            tensors: w.tensors,
            bytes_written: w.bytes_written,
            seconds: w.seconds,
            expert_only: w.expert_only,
        }
    }
}
