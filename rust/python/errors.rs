//! Python exception classes (one base, `LayerswapError`), registered under the `layerswap_fast`
//! namespace so that `pickle` finds them there, and the single table that maps engine errors to them.
//!
//! OS errors become `OSError(errno, message, path)`, which Python itself turns into the subclass the
//! errno names (`FileNotFoundError`, `PermissionError`, `IsADirectoryError`...). An error reported as
//! data (one expert of a bulk run that could not be opened) is the exception [`to_py`] makes, so a
//! raised error and a reported one can never disagree.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyboardInterrupt, PyOSError};
use pyo3::prelude::*;

use crate::error::Error;

create_exception!(
    layerswap_fast,
    LayerswapError,
    PyException,
    "Base class of every error layerswap-fast raises on purpose."
);
create_exception!(
    layerswap_fast,
    InvalidModelError,
    LayerswapError,
    "A file or folder is not a valid model: bad header, truncated data, broken index, unknown layout."
);
create_exception!(
    layerswap_fast,
    IncompatibleModelsError,
    LayerswapError,
    "The models disagree: a tensor missing, or of another shape, dtype or layer count."
);
create_exception!(
    layerswap_fast,
    NonFiniteTensorError,
    InvalidModelError,
    "A tensor holds NaN or Inf."
);
create_exception!(
    layerswap_fast,
    MemoryBudgetError,
    LayerswapError,
    "The memory budget is too small for the work."
);
create_exception!(
    layerswap_fast,
    InvalidOptionError,
    LayerswapError,
    "An option is outside its allowed range."
);

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("LayerswapError", py.get_type::<LayerswapError>())?;
    m.add("InvalidModelError", py.get_type::<InvalidModelError>())?;
    m.add(
        "IncompatibleModelsError",
        py.get_type::<IncompatibleModelsError>(),
    )?;
    m.add("NonFiniteTensorError", py.get_type::<NonFiniteTensorError>())?;
    m.add("MemoryBudgetError", py.get_type::<MemoryBudgetError>())?;
    m.add("InvalidOptionError", py.get_type::<InvalidOptionError>())?;
    Ok(())
}

/// The errno of an OS error; for one the engine made itself (no errno), the errno of its kind.
fn errno(source: &std::io::Error) -> i32 {
    use std::io::ErrorKind;
    source.raw_os_error().unwrap_or(match source.kind() {
        ErrorKind::NotFound => libc::ENOENT,
        ErrorKind::PermissionDenied => libc::EACCES,
        ErrorKind::IsADirectory => libc::EISDIR,
        ErrorKind::NotADirectory => libc::ENOTDIR,
        ErrorKind::AlreadyExists => libc::EEXIST,
        _ => 0,
    })
}

/// The one mapping from engine errors to Python exceptions.
pub(crate) fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Io { path, source } => PyOSError::new_err((
            errno(&source),
            format!("{}: {}", path.display(), source),
            path.display().to_string(),
        )),
        Error::InvalidModel { .. } | Error::Layout { .. } => InvalidModelError::new_err(msg),
        Error::NonFinite { .. } => NonFiniteTensorError::new_err(msg),
        Error::Incompatible { .. } => IncompatibleModelsError::new_err(msg),
        Error::Budget { .. } => MemoryBudgetError::new_err(msg),
        Error::InvalidArgument { .. } => InvalidOptionError::new_err(msg),
        Error::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
    }
}

/// An engine error as an exception object (for errors reported as data rather than raised).
pub(crate) fn to_exception(py: Python<'_>, err: Error) -> Py<PyAny> {
    to_py(err).into_value(py).into_any()
}

/// An invalid-option error with `message`.
pub(crate) fn invalid_option(message: impl Into<String>) -> PyErr {
    to_py(Error::argument(message.into()))
}
