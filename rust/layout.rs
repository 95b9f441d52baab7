//! Which tensor belongs to which unit. Layouts are data (JSON definitions under `rust/layouts/`, or a
//! user's own file), never code per model family: adding a family means adding a definition.
//!
//! A definition gives a regex whose first capture group is the decoder-layer index; the rest of the
//! name after that match is classified as attention, MLP, or the layer's own (its norms). A third regex
//! names the measured ("target") tensors within the layer, per METHOD.md §1. Everything that is not in
//! a decoder layer is "outside".

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The built-in layout definitions, in the order detection tries them.
pub const BUILTIN_LAYOUTS: &[(&str, &str)] = &[("llama", include_str!("layouts/llama.json"))];

/// A layout definition as written in JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutDef {
    /// Short name, shown in reports.
    pub name: String,
    /// One line for `inspect`.
    #[serde(default)]
    pub description: String,
    /// config.json `architectures[0]` values this layout is chosen for.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Regex matched at the start of a tensor name; capture 1 is the layer index.
    pub layer: String,
    /// Regex on the rest of the name (after the `layer` match) that puts a tensor in the attention unit.
    pub attention: String,
    /// Regex on the rest of the name that puts a tensor in the MLP unit.
    pub mlp: String,
    /// Regex on the rest of the name that marks a measured tensor (must be in attention or MLP).
    pub targets: String,
}

/// Which part of a decoder layer a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// The attention submodule.
    Attention,
    /// The MLP (feed-forward) submodule.
    Mlp,
    /// The layer's own tensors outside both submodules (its layer norms).
    Norm,
}

/// Where a tensor belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Place {
    /// In decoder layer `layer`, part `part`; `target` if it is measured.
    Layer {
        /// Layer index.
        layer: usize,
        /// Submodule.
        part: Part,
        /// Measured (contributes to scores).
        target: bool,
    },
    /// Outside the decoder layers (embeddings, final norm, lm_head, ...).
    Outside,
}

/// A layout resolved against a model's tensor names.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The definition used.
    pub def: LayoutDef,
    /// Number of decoder layers.
    pub n_layers: usize,
    /// (name, place) for every tensor, sorted by name.
    pub places: Vec<(String, Place)>,
}

struct Compiled {
    layer: Regex,
    attention: Regex,
    mlp: Regex,
    targets: Regex,
}

impl LayoutDef {
    /// Parses a JSON definition.
    pub fn from_json(text: &str) -> Result<LayoutDef> {
        serde_json::from_str(text).map_err(|e| Error::Layout { message: format!("invalid layout definition: {e}") })
    }

    /// The built-in definitions.
    pub fn builtins() -> Vec<LayoutDef> {
        BUILTIN_LAYOUTS.iter().map(|(_, t)| LayoutDef::from_json(t).expect("built-in layout is valid")).collect()
    }

    fn compile(&self) -> Result<Compiled> {
        let re = |field: &str, s: &str| {
            Regex::new(s).map_err(|e| Error::Layout { message: format!("layout '{}': invalid regex in '{field}': {e}", self.name) })
        };
        let c = Compiled {
            layer: re("layer", &self.layer)?,
            attention: re("attention", &self.attention)?,
            mlp: re("mlp", &self.mlp)?,
            targets: re("targets", &self.targets)?,
        };
        if c.layer.captures_len() < 2 {
            return Err(Error::Layout { message: format!("layout '{}': 'layer' regex needs a capture group for the layer index", self.name) });
        }
        Ok(c)
    }

    /// Classifies every name. Fails on layer indices that are not 0..L-1 or a layer without targets.
    pub fn resolve<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Layout> {
        let c = self.compile()?;
        let mut places = vec![];
        let mut targets_per_layer: Vec<usize> = vec![];
        for name in names {
            let place = match c.layer.captures(name) {
                None => Place::Outside,
                Some(cap) => {
                    let idx: usize = cap[1].parse().map_err(|_| Error::Layout {
                        message: format!("layout '{}': tensor '{name}': layer index '{}' is not a number", self.name, &cap[1]),
                    })?;
                    let rest = &name[cap.get(0).unwrap().end()..];
                    let part = if c.attention.is_match(rest) {
                        Part::Attention
                    } else if c.mlp.is_match(rest) {
                        Part::Mlp
                    } else {
                        Part::Norm
                    };
                    let target = part != Part::Norm && c.targets.is_match(rest);
                    if targets_per_layer.len() <= idx {
                        targets_per_layer.resize(idx + 1, 0);
                    }
                    targets_per_layer[idx] += target as usize;
                    Place::Layer { layer: idx, part, target }
                }
            };
            places.push((name.to_string(), place));
        }
        places.sort_by(|a, b| a.0.cmp(&b.0));
        let n_layers = targets_per_layer.len();
        if n_layers == 0 {
            return Err(Error::Layout { message: format!("layout '{}': no tensor name matches its layer pattern '{}'", self.name, self.layer) });
        }
        if let Some(l) = targets_per_layer.iter().position(|&n| n == 0) {
            return Err(Error::Layout {
                message: format!("layout '{}': decoder layer {l} of {n_layers} has no measured tensors (missing layer, or wrong layout?)", self.name),
            });
        }
        Ok(Layout { def: self.clone(), n_layers, places })
    }
}

impl Layout {
    /// Picks a layout for these tensor names: the user's definition if given; else the built-in one
    /// that lists `architecture`; else the first built-in whose patterns fit the names.
    pub fn detect(names: &[&str], architecture: Option<&str>, custom: Option<&LayoutDef>) -> Result<Layout> {
        if let Some(def) = custom {
            return def.resolve(names.iter().copied());
        }
        let builtins = LayoutDef::builtins();
        if let Some(arch) = architecture {
            if let Some(def) = builtins.iter().find(|d| d.architectures.iter().any(|a| a == arch)) {
                return def.resolve(names.iter().copied());
            }
        }
        for def in &builtins {
            if let Ok(layout) = def.resolve(names.iter().copied()) {
                return Ok(layout);
            }
        }
        let sample: Vec<&str> = names.iter().take(3).copied().collect();
        Err(Error::Layout {
            message: format!(
                "unknown model layout{}: no built-in layout ({}) matches tensor names like {:?}; pass a custom layout file",
                architecture.map(|a| format!(" ({a})")).unwrap_or_default(),
                builtins.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
                sample
            ),
        })
    }

    /// The place of a tensor (Outside for names the layout has not seen).
    pub fn place(&self, name: &str) -> Place {
        match self.places.binary_search_by(|p| p.0.as_str().cmp(name)) {
            Ok(i) => self.places[i].1,
            Err(_) => Place::Outside,
        }
    }

    /// Names of the measured tensors, sorted.
    pub fn targets(&self) -> Vec<&str> {
        self.places
            .iter()
            .filter(|(_, p)| matches!(p, Place::Layer { target: true, .. }))
            .map(|(n, _)| n.as_str())
            .collect()
    }
}
