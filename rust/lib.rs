//! layerswap-fast: the streaming engine for layer-wise swapping of a safety expert into language
//! experts (Shin & Hwang, EACL 2026). See `../shared/METHOD.md` for the method this implements.
//!
//! Stages, in the order a merge runs them: [`io`] (read safetensors shards and model folders),
//! [`layout`] (tensor -> unit), [`budget`] (memory), [`stats`] (float64 norm pass), [`score`] and
//! [`plan`] (METHOD.md formulas and decisions), [`blend`] (write pass), tied together by [`pipeline`].
//! The Python binding lives in `python` and is compiled only with the `python` feature.

pub mod blend;
pub mod budget;
pub mod checksum;
pub mod dtype;
pub mod error;
pub mod expert;
pub mod io;
pub mod layout;
pub mod lora;
pub mod official;
pub mod options;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod score;
pub mod stats;
pub mod stream;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
pub use options::{Granularity, MergeOptions, Numerics, SourcePolicy};
pub use pipeline::{open, Session, WriteSummary};
pub use plan::{Decision, Plan};

/// The crate version, reported in every merge report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
