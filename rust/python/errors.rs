//! Python exception classes (one base, `LayerswapError`), registered under the `layerswap_fast`
//! namespace so that `pickle` finds them there, and the single table that maps engine errors
//! and OS error kinds to them.

use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyIsADirectoryError, PyKeyboardInterrupt, PyOSError, PyPermissionError,
};
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

/// The one mapping from engine errors to Python exceptions.
pub(crate) fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Io { path, source } => {
            let args = (
                source.raw_os_error().unwrap_or(0),
                format!("{}: {}", path.display(), source),
                path.display().to_string(),
            );
            match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(args),
                _ => PyOSError::new_err(args),
            }
        }
        Error::InvalidModel { .. } | Error::Layout { .. } => InvalidModelError::new_err(msg),
        Error::NonFinite { .. } => NonFiniteTensorError::new_err(msg),
        Error::Incompatible { .. } => IncompatibleModelsError::new_err(msg),
        Error::Budget { .. } => MemoryBudgetError::new_err(msg),
        Error::InvalidArgument { .. } => InvalidOptionError::new_err(msg),
        Error::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
    }
}

/// The Python exception class name an engine error maps to (for errors reported as data, e.g. one
/// failed expert of a bulk run).
pub(crate) fn kind_name(err: &Error) -> &'static str {
    match err {
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => "FileNotFoundError",
            std::io::ErrorKind::PermissionDenied => "PermissionError",
            _ => "OSError",
        },
        Error::InvalidModel { .. } | Error::Layout { .. } => "InvalidModelError",
        Error::NonFinite { .. } => "NonFiniteTensorError",
        Error::Incompatible { .. } => "IncompatibleModelsError",
        Error::Budget { .. } => "MemoryBudgetError",
        Error::InvalidArgument { .. } => "InvalidOptionError",
        Error::Cancelled => "KeyboardInterrupt",
    }
}
