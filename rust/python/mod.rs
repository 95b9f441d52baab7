//! The private native module `layerswap_fast._core`. Thin and typed: a [`session::PySession`] opens
//! the models once and runs the analyze and write stages on them; the results are frozen classes
//! ([`types`]); options are read straight from the Python `MergeOptions` ([`convert`]). Every call
//! converts its arguments to owned Rust values, runs the engine with the GIL released (see
//! [`progress::run`]) and maps the error through the one table in [`errors`]. Nothing crosses as JSON
//! text.

#![allow(
    clippy::needless_pass_by_value,
    reason = "pyo3 hands #[pyfunction]s owned arguments (Vec, PathBuf, Py) extracted from Python"
)]

use pyo3::prelude::*;

mod convert;
mod dlpack;
mod errors;
mod functions;
mod progress;
mod session;
mod state_dicts;
mod types;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", crate::VERSION)?;
    m.add("MAX_THREADS", crate::options::MAX_THREADS)?;
    errors::register(m)?;
    functions::register(m)?;
    state_dicts::register(m)?;
    m.add_class::<session::PySession>()?;
    m.add_class::<types::PyPlan>()?;
    m.add_class::<types::PyUnitDecision>()?;
    m.add_class::<types::PyTensorStats>()?;
    m.add_class::<types::PyWriteSummary>()?;
    m.add_class::<types::PySums>()?;
    Ok(())
}
