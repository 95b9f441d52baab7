//! Method and resource options. Mirrors `python/layerswap_fast/options.py`, which validates for the
//! user's sake; the engine validates again so that no caller can run it with nonsense.

use serde::{Deserialize, Serialize};

use crate::analyze::plan::Decision;
use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// What a unit is (METHOD.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One unit per decoder layer; score = plain sum of relative changes.
    Layer,
    /// Attention and MLP of each layer are separate units; score = root of sum of squares.
    Module,
}

/// How numbers are computed (METHOD.md "What layerswap-fast does" and §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Numerics {
    /// Exact differences, float64 sums, float32 blends rounded once.
    Exact,
    /// The authors' bf16 arithmetic, bit for bit.
    Official,
}

/// Where the vocabulary tensors (token embeddings, lm_head; [`crate::layout::Place::Vocab`]) come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VocabSource {
    /// Like every other outside tensor (`outside` policy); the safety and language experts must then
    /// have the same vocabulary shapes, else the merge is refused naming both shapes.
    #[default]
    Outside,
    /// Always the language expert's tensors, whatever their shapes: for a language expert whose
    /// vocabulary was extended (its tokenizer and config.json go to the output anyway).
    Expert,
}

/// Most worker threads a merge may ask for. Far above any machine's cores, low enough that an absurd
/// value (`--threads 4611686018427387904`) is refused instead of making the budget spin or spawn forever.
pub const MAX_THREADS: usize = 4096;

/// Everything that shapes a merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeOptions {
    /// Unit granularity.
    pub granularity: Granularity,
    /// Decision threshold on d = p_S - p_M.
    pub tau: f64,
    /// Blend weight of the safety expert.
    pub alpha: f64,
    /// Arithmetic mode.
    pub numerics: Numerics,
    /// Tensors outside the decoder layers (METHOD.md §5: blend).
    pub outside: Decision,
    /// A layer's own norms in module granularity (METHOD.md §5: expert).
    pub norms: Decision,
    /// Vocabulary tensors: like other outside tensors, or always the language expert's.
    #[serde(default)]
    pub vocab_from: VocabSource,
    /// Output element type; None keeps each tensor's input dtype.
    pub out_dtype: Option<Dtype>,
    /// Refuse tensors containing NaN/Inf unless this is set.
    pub allow_non_finite: bool,
    /// Peak memory budget in bytes.
    pub max_memory: u64,
    /// Worker threads.
    pub threads: usize,
    /// Maximum bytes of tensor data per output shard.
    pub shard_size: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            granularity: Granularity::Layer,
            tau: 0.001,
            alpha: 0.5,
            numerics: Numerics::Exact,
            outside: Decision::Blend,
            norms: Decision::Expert,
            vocab_from: VocabSource::Outside,
            out_dtype: None,
            allow_non_finite: false,
            max_memory: 1 << 30,
            threads: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            shard_size: 5_000_000_000,
        }
    }
}

impl MergeOptions {
    /// Rejects values outside their ranges, naming the option and what is allowed.
    pub fn validate(&self) -> Result<()> {
        if !(self.tau.is_finite() && self.tau >= 0.0) {
            return Err(Error::argument(format!(
                "tau must be a finite number >= 0, got {}",
                self.tau
            )));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(Error::argument(format!(
                "alpha must be between 0 and 1, got {}",
                self.alpha
            )));
        }
        if let Some(d) = self.out_dtype.filter(|d| !d.is_float()) {
            return Err(Error::argument(format!(
                "out_dtype must be a float type (BF16, F16, F32, F64), got {d}"
            )));
        }
        if self.threads == 0 {
            return Err(Error::argument("threads must be at least 1"));
        }
        if self.threads > MAX_THREADS {
            return Err(Error::argument(format!(
                "threads must be at most {MAX_THREADS}, got {}",
                self.threads
            )));
        }
        if self.shard_size == 0 {
            return Err(Error::argument("shard size must be positive"));
        }
        Ok(())
    }
}
