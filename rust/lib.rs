//! layerswap-fast: the streaming engine for layer-wise swapping of a safety expert into language
//! experts (Shin & Hwang, EACL 2026). See `../shared/METHOD.md` for the method this implements.
//!
//! A merge runs three stages, one word each in files, types, functions and progress phases:
//! - [`open`]: open the base model B, the safety expert S and the language experts M once, and check
//!   that they fit together ([`Session`]);
//! - [`analyze`]: one pass for the sums of squares of every measured tensor, the scores of every
//!   unit and one [`Plan`] of decisions per language expert;
//! - [`write`]: the write pass of one language expert's merged model from its plan.
//!
//! Beneath them: [`io`] (safetensors shards and model folders), [`layout`] (tensor -> unit),
//! [`budget`] (memory and worker pools), [`dtype`] (element types and conversions), [`official`] (the
//! authors' arithmetic, for `official` numerics), [`progress`] (counters and Ctrl-C). The Python
//! binding lives in `python` and is compiled only with the `python` feature.

pub mod analyze;
pub mod budget;
pub mod checksum;
pub mod dtype;
pub mod emit;
pub mod error;
pub mod expert;
pub mod io;
pub mod layout;
pub mod lora;
pub mod official;
pub mod open;
pub mod options;
pub mod progress;
pub mod stream;
pub mod write;

#[cfg(feature = "python")]
mod python;

pub use analyze::Measured;
pub use analyze::{Decision, Plan, TensorStats, UnitDecision};
pub use error::{Error, Result};
pub use open::{open, Session};
pub use options::{Granularity, MergeOptions, Numerics};
pub use write::WriteSummary;

/// The crate version, reported in every merge report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
