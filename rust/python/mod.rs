//! The private native module `layerswap_fast._core`. Thin: every function converts its arguments to
//! owned Rust values, runs the engine with the GIL released (see [`progress::run`]) and maps the error
//! through the one table in [`errors`]. Results cross back as JSON strings, which the Python package
//! turns into its own typed objects.

#![allow(
    clippy::needless_pass_by_value,
    reason = "pyo3 hands #[pyfunction]s owned arguments (Vec, PathBuf, Py) extracted from Python"
)]

use pyo3::prelude::*;

mod dlpack;
mod errors;
mod functions;
mod progress;
mod state_dicts;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", crate::VERSION)?;
    errors::register(m)?;
    functions::register(m)?;
    state_dicts::register(m)?;
    Ok(())
}
