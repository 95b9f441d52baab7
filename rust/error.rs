//! The engine's error type. Every variant names the file and/or the tensor it is about, so that the
//! one-line message a user sees is enough to find the problem.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS-level I/O failure while reading or writing `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The OS error (its kind decides the Python exception).
        #[source]
        source: std::io::Error,
    },
    /// A file is not a valid safetensors file, or a model folder is inconsistent.
    #[error("{path}: {message}")]
    InvalidModel {
        /// The offending file or folder.
        path: PathBuf,
        /// What is wrong and, where it helps, what is allowed.
        message: String,
    },
    /// The models disagree on a tensor (missing, shape, dtype, layer count).
    #[error("{message}")]
    Incompatible {
        /// The tensor, models and shapes concerned.
        message: String,
    },
    /// The tensor names do not match any known layout, or a layout definition is invalid.
    #[error("{message}")]
    Layout {
        /// What was expected.
        message: String,
    },
    /// A tensor holds NaN or Inf, which would make its statistics meaningless.
    #[error("{path}: tensor '{tensor}' contains NaN or Inf values; statistics would be meaningless (--allow-non-finite, or allow_non_finite=True in Python, merges anyway)")]
    NonFinite {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// The memory budget is too small for the requested work.
    #[error("{message}")]
    Budget {
        /// How much is needed at least.
        message: String,
    },
    /// An argument is outside its allowed range.
    #[error("{message}")]
    InvalidArgument {
        /// The argument, its value and what is allowed.
        message: String,
    },
    /// The caller asked the work to stop (Ctrl-C, SIGTERM).
    #[error("cancelled")]
    Cancelled,
}

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// An invalid-model error about `path`.
    pub fn invalid(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::InvalidModel {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// An argument error.
    pub fn argument(message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            message: message.into(),
        }
    }

    /// Names the model a layout error is about (layout detection sees only tensor names).
    pub fn in_model(self, model: &Path) -> Self {
        match self {
            Error::Layout { message } => Error::Layout {
                message: format!("{}: {message}", model.display()),
            },
            other => other,
        }
    }
}
