//! An expert (S or M) is either a full fine-tuned model or a PEFT LoRA adapter over the base model.
//! Both present the same tensor names, shapes and dtypes to the checks and the plan; only where the
//! values come from differs (see [`Expert::term`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::io::{Model, Stamp, TensorRef};
use crate::lora::{is_adapter, Adapter, LoraModule};

/// A safety or language expert.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per opened model: a few per run, never in a collection that matters"
)]
pub enum Expert {
    /// A full model folder or file.
    Full(Model),
    /// A LoRA adapter. `tensors` is the model it stands for: the base model's tensors (their dtype and
    /// shape; reads go through [`Expert::term`]) plus tensors only the adapter saves whole.
    Lora {
        /// The adapter.
        adapter: Adapter,
        /// Metadata of the tensors of B + ΔW.
        tensors: BTreeMap<String, TensorRef>,
    },
}

/// Where the values of one tensor of an expert come from.
#[derive(Debug, Clone, Copy)]
pub enum Term<'a> {
    /// Stored bytes: of a full model, of a tensor an adapter saved whole, or the base model's for a
    /// tensor an adapter does not touch.
    Bytes(&'a Model, &'a TensorRef),
    /// The base tensor plus a low-rank update.
    Delta {
        /// The adapter holding the factors.
        adapter: &'a Adapter,
        /// The update.
        module: &'a LoraModule,
        /// The base model.
        base: &'a Model,
        /// The base tensor.
        tensor: &'a TensorRef,
    },
}

/// What a report says about an expert.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertInfo {
    /// "full" or "lora".
    pub kind: &'static str,
    /// The path given.
    pub path: String,
    /// Largest LoRA rank (LoRA only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<u64>,
    /// Tensors updated by LoRA factors (LoRA only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_tensors: Option<usize>,
    /// Tensors the adapter saved whole (`modules_to_save`, trained biases; LoRA only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_tensors: Option<Vec<String>>,
    /// Where the statistics of its task vector come from: "tensors" (X − B read element by element)
    /// or "factors" (‖ΔW‖ from the LoRA factors; tensors saved whole are still read).
    pub stats_source: &'static str,
    /// The adapter's configuration (LoRA only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<crate::lora::LoraConfig>,
}

impl Expert {
    /// Opens `path`: a PEFT adapter folder (it has `adapter_config.json`) over `base`, else a model.
    pub fn open(path: &Path, base: &Model) -> Result<Expert> {
        if !is_adapter(path) {
            return Ok(Expert::Full(Model::open(path)?));
        }
        let adapter = Adapter::open(path, base)?;
        let mut tensors = base.tensors.clone();
        for (name, saved) in &adapter.full {
            if !tensors.contains_key(name) {
                tensors.insert(name.clone(), adapter.file.tensor(saved).expect("listed").clone());
            }
        }
        Ok(Expert::Lora { adapter, tensors })
    }

    /// The path the user gave.
    pub fn path(&self) -> &Path {
        match self {
            Expert::Full(m) => &m.path,
            Expert::Lora { adapter, .. } => &adapter.path,
        }
    }

    /// Every tensor of the model this expert stands for.
    pub fn tensors(&self) -> &BTreeMap<String, TensorRef> {
        match self {
            Expert::Full(m) => &m.tensors,
            Expert::Lora { tensors, .. } => tensors,
        }
    }

    /// Dtype and shape of a tensor (for a LoRA expert: the base model's, for the output takes them).
    pub fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.tensors().get(name)
    }

    /// The adapter, for a LoRA expert.
    pub fn adapter(&self) -> Option<&Adapter> {
        match self {
            Expert::Full(_) => None,
            Expert::Lora { adapter, .. } => Some(adapter),
        }
    }

    /// Where tensor `name` (which [`Expert::tensor`] knows) comes from.
    pub fn term<'a>(&'a self, name: &str, base: &'a Model) -> Term<'a> {
        match self {
            Expert::Full(m) => Term::Bytes(m, m.tensor(name).expect("checked by caller")),
            Expert::Lora { adapter, .. } => {
                if let Some(saved) = adapter.full.get(name) {
                    return Term::Bytes(&adapter.file, adapter.file.tensor(saved).expect("listed"));
                }
                let tensor = base
                    .tensor(name)
                    .expect("an adapter expert has the base model's tensors");
                match adapter.modules.get(name) {
                    Some(module) => Term::Delta {
                        adapter,
                        module,
                        base,
                        tensor,
                    },
                    None => Term::Bytes(base, tensor),
                }
            }
        }
    }

    /// Fails if a file read changed since it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        match self {
            Expert::Full(m) => m.check_unchanged(),
            Expert::Lora { adapter, .. } => adapter.file.check_unchanged(),
        }
    }

    /// Path and stamp of every file whose data is read (see [`Model::stamps`]).
    pub fn stamps(&self) -> Vec<(std::path::PathBuf, Stamp)> {
        match self {
            Expert::Full(m) => m.stamps(),
            Expert::Lora { adapter, .. } => adapter.file.stamps(),
        }
    }

    /// What the report says about this expert.
    pub fn info(&self) -> ExpertInfo {
        match self {
            Expert::Full(m) => ExpertInfo {
                kind: "full",
                path: m.path.display().to_string(),
                rank: None,
                lora_tensors: None,
                saved_tensors: None,
                stats_source: "tensors",
                config: None,
            },
            Expert::Lora { adapter, .. } => ExpertInfo {
                kind: "lora",
                path: adapter.path.display().to_string(),
                rank: Some(adapter.max_rank()),
                lora_tensors: Some(adapter.modules.len()),
                saved_tensors: Some(adapter.full.keys().cloned().collect()),
                stats_source: "factors",
                config: Some(adapter.config.clone()),
            },
        }
    }
}

/// Tensor metadata by name, for the checks that models fit together: a model or an expert.
pub trait TensorSet {
    /// The path the user gave.
    fn path(&self) -> &Path;
    /// Every tensor, by name.
    fn tensors(&self) -> &BTreeMap<String, TensorRef>;
    /// One tensor.
    fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.tensors().get(name)
    }
}

impl TensorSet for Model {
    fn path(&self) -> &Path {
        &self.path
    }
    fn tensors(&self) -> &BTreeMap<String, TensorRef> {
        &self.tensors
    }
}

impl TensorSet for Expert {
    fn path(&self) -> &Path {
        Expert::path(self)
    }
    fn tensors(&self) -> &BTreeMap<String, TensorRef> {
        Expert::tensors(self)
    }
}
